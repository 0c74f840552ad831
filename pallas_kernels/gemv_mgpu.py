"""Weight-only W4 GEMV / skinny GEMM for decode on Pallas Mosaic GPU (Hopper, sm_90).

    y[m, n] = sum_k x[m, k] * qw[k, n] * s[k // g, n]

Same operands, packed layout and jnp reference as gemv_w4.gemv_w4 / gemv_w4_ref:
  x         bf16 or f16 [M, K], M <= 256 (decode: 1..16); float32 x is rounded to bf16 (16-bit wgmma)
  w_packed  int8 [K/2, N]  int4 codes [in, out] packed along K (pallas_kernels.int4)
  w_scale   f32 [1, N] per output channel, or [K/g, N] per group of g rows along K (g a multiple of 128)
  result    out_dtype (default x.dtype) [M, N]

Bandwidth-bound, so every packed weight byte is read from memory once, by TMA, in its stored layout.
The product is computed transposed, y^T = W^T x^T, so that the weight tile fills wgmma's 64-row M side
and the few activation rows are its N side (padded to Mp = 16 / 32 / 64.. columns, not 64 rows):
  memory warpgroup   TMA of the K steps of the packed weight tile [block_k / 2, block_n] and of
                     x^T's even and odd K rows [block_k / 2, Mp] (the wrapper splits x by parity)
  compute warpgroup  unpack the nibbles in registers (int16 shifts), convert the codes to x's dtype
                     (exact: |code| <= 8), store them to shared memory and run two 16-bit wgmmas,
                         acc^T += lo(W)^T . x_even^T + hi(W)^T . x_odd^T      (f32 accumulator)
                     (the weight operand is the transposed view of the stored [K, N] tile: 16-bit
                     wgmma takes either major-ness). With group scales each K step is one group and
                     its partial sum is scaled before it is added, as in the Triton kernel.
Grid: (N / block_n, split) CTAs; `split` divides K so that the GPU has enough CTAs (N / 64 alone is 64
for N = 4096). Each CTA writes its f32 partial sums [block_n, Mp]; the wrapper adds the splits, applies
a per-channel scale and transposes back (a [split, N, Mp] array: small next to the weights).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _mgpu
from pallas_kernels._common import next_pow2, pad_axis, round_up
from pallas_kernels.gemm_mgpu import MEMORY_REGISTERS
from pallas_kernels.gemv_w4 import check_gemv_args

MAX_ROWS = 256  # wgmma's N side (the activation rows here) is at most 256
TARGET_CTAS = 264  # two waves of an H100's 132 SMs


def gemv_tiles(M: int, N: int, K: int, groups: int, block_n=None, block_k=None, split=None, stages=None):
    """(Mp, block_n, block_kh, split, stages, swizzle) for gemv_w4_mgpu (see the module docstring).

    Mp: M rounded up to 16 (the 32-byte swizzle minimum) or a power of two from 64; block_n 64 (wgmma
    M granule; more would halve the CTAs); block_k: 256 codes, or the group size (a multiple of 128:
    the weight tile's rows are loaded in 64-row WGMMA register tiles; smaller groups stay on the Triton
    kernel); swizzle: the activation tile's row (2 Mp bytes, at most 128); split: a power of two
    giving >= TARGET_CTAS CTAs with >= 2 K steps each; stages: up to 4 within shared memory.
    """
    if M > MAX_ROWS:
        raise ValueError(f"gemv_w4_mgpu takes M <= {MAX_ROWS} rows, got {M}")
    Mp = 16 if M <= 16 else 32 if M <= 32 else next_pow2(M)
    bn = block_n or 64
    bk = (K // groups) if groups > 1 else (block_k or 256)
    if bn % 64 or bk % 128:
        raise ValueError(f"block_n must be a multiple of 64 and block_k (or the group size) of 128; got {bn}, {bk}")
    bkh = bk // 2  # a multiple of 64: the weight tile is loaded in the WGMMA register layout (64-row tiles)
    swizzle = min(plgpu.find_swizzle(Mp * 2 * 8), 128)
    nk = -(-K // bk)
    if split is None:
        split = 1
        while split * 2 * 2 <= nk and (-(-N // bn)) * split < TARGET_CTAS:
            split *= 2
    if groups > 1 and split > 1 and groups % split:
        split = 1
    if stages is None:
        per_stage = bkh * bn + 2 * bkh * Mp * 2
        fixed = 2 * bkh * bn * 2 + bn * Mp * 4 + bn * 4
        stages = max(1, min(4, -(-nk // split), (_mgpu.SMEM_BUDGET - fixed) // per_stage))
    return Mp, bn, bkh, split, stages, swizzle


def _gemv_kernel(w_g, xe_g, xo_g, s_g, o_g, wlo, whi, o_s, *, bn, bkh, mp, nk, stages, grouped, swizzle,
                 interpreting):
    ni, si = lax.axis_index("n"), lax.axis_index("s")
    cols, ksl = pl.ds(ni * bn, bn), pl.ds(si * nk * bkh, nk * bkh)
    cdt = xe_g.dtype

    def mma(acc, w_s, xe_s, xo_s):
        lo, hi = _mgpu.nibbles(w_s[...])
        _mgpu.store_transposable(wlo, lo.astype(cdt), interpreting)
        _mgpu.store_transposable(whi, hi.astype(cdt), interpreting)
        plgpu.commit_smem()
        plgpu.wgmma(acc, _mgpu.transposed_view(wlo, interpreting), xe_s)
        plgpu.wgmma(acc, _mgpu.transposed_view(whi, interpreting), xo_s)
        plgpu.wgmma_wait(0)

    def finish(value):
        o_s[...] = value
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_s, o_g.at[si, cols])
        plgpu.wait_smem_to_gmem(0)

    if grouped:  # the carry is the f32 register sum; each step's group partial is scaled, then added
        def compute_context(eval_pipeline):
            zero = jnp.zeros((bn, mp), jnp.float32)
            finish(eval_pipeline(zero if interpreting else plgpu.layout_cast(zero, plgpu.Layout.WGMMA)))

        def step(_, w_s, xe_s, xo_s, s_s, total):
            @functools.partial(pl.run_scoped, acc=plgpu.ACC((bn, mp), jnp.float32))
            def part(acc):
                mma(acc, w_s, xe_s, xo_s)
                return acc[...]
            s = _mgpu.load_hinted(s_s.at[0], _mgpu.row_vector_layout(), interpreting)
            return total + part * lax.broadcast_in_dim(s, (bn, mp), (0,))
    else:
        def compute_context(eval_pipeline):
            @functools.partial(pl.run_scoped, acc=plgpu.ACC((bn, mp), jnp.float32))
            def _(acc):
                eval_pipeline(acc)
                finish(acc[...])

        def step(_, w_s, xe_s, xo_s, acc):
            mma(acc, w_s, xe_s, xo_s)
            return acc

    x_spec = plgpu.BlockSpec((bkh, mp), lambda k: (k, 0), transforms=_mgpu.swizzled(mp * 2, 2, swizzle))
    specs = [plgpu.BlockSpec((bkh, bn), lambda k: (k, 0), transforms=_mgpu.swizzled(bn, 1)), x_spec, x_spec]
    operands = [w_g.at[ksl, cols], xe_g.at[ksl], xo_g.at[ksl]]
    if grouped:
        specs.append(plgpu.BlockSpec((1, bn), lambda k: (k, 0)))
        operands.append(s_g.at[pl.ds(si * nk, nk), cols])
    plgpu.emit_pipeline_warp_specialized(
        step, grid=(nk,), memory_registers=MEMORY_REGISTERS, wg_axis="wg", num_compute_wgs=1,
        max_concurrent_steps=stages, compute_context=compute_context, in_specs=specs)(*operands)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_n", "block_k", "split", "stages", "interpret"))
def gemv_w4_mgpu(x, w_packed, w_scale, out_dtype=None, *, block_n=None, block_k=None, split=None, stages=None,
                 interpret=None):
    """y = x @ dequant(w_packed, w_scale) on Mosaic GPU, [M, N] in out_dtype (default x.dtype).

    Arguments as gemv_w4.gemv_w4's (M <= 256, bf16 / f16 compute); split / stages / block_n / block_k:
    gemv_tiles'. interpret: None (on the CPU only), a bool, or an InterpretGPUParams.
    """
    M, K, N, s = check_gemv_args(x, w_packed, w_scale)
    groups = s.shape[0]
    out_dtype = x.dtype if out_dtype is None else out_dtype
    cdt = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
    mp, bn, bkh, split, stages, swizzle = gemv_tiles(M, N, K, groups, block_n, block_k, split, stages)
    Khp = round_up(K // 2, bkh * split)
    nk = Khp // bkh // split
    xt = pad_axis(pad_axis(x.astype(cdt), 0, mp), 1, 2 * Khp).T  # [2 Khp, Mp]: x^T, rows by K
    wp = pad_axis(pad_axis(w_packed.astype(jnp.int8), 0, Khp), 1, bn)
    sg = pad_axis(pad_axis(s, 0, Khp // bkh), 1, bn) if groups > 1 else s
    Np = wp.shape[1]
    params = _mgpu.interpret_params(interpret)
    interpreting = params is not None
    if interpreting:
        _mgpu.install_thread_compile_cache()
    code_tile = functools.partial(_mgpu.transposable_scratch, bkh, bn, cdt, interpreting, swizzle)
    scratch = dict(wlo=code_tile(), whi=code_tile(), o_s=plgpu.SMEM((bn, mp), jnp.float32))
    kernel = functools.partial(_gemv_kernel, bn=bn, bkh=bkh, mp=mp, nk=nk, stages=stages, grouped=groups > 1,
                               swizzle=swizzle, interpreting=interpreting)
    call = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((split, Np, mp), jnp.float32),
                        grid=(Np // bn, split), grid_names=("n", "s"), num_threads=2, thread_name="wg",
                        scratch_types=scratch, interpret=params if interpreting else False,
                        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
                        kernel_name="gemv_w4_mgpu")
    partial = call(wp, xt[0::2], xt[1::2], sg)
    acc = jnp.sum(partial, axis=0)[:N]  # [N, Mp]
    if groups == 1:
        acc = acc * s.reshape(N, 1)
    return acc.T[:M].astype(out_dtype)
