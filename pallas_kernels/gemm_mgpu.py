"""W4A4 and W4A8 GEMM on Pallas Mosaic GPU (Hopper, sm_90): TMA, warp-specialized pipeline, int8 wgmma.

    y[m, n] = x_scale[m] * w_scale[n] * sum_k qx[m, k] * qw[k, n]

Same operands, packed int4 layout (pallas_kernels.int4), epilogue and jnp references as the Triton
kernels (gemm_w4a4.w4a4_matmul_ref, gemm_w4a8.w4a8_matmul_ref):
  W4A4  x_packed int8 [M, K/2] (codes packed along K),  W4A8  x int8 [M, K]
  x_scale f32 [M, 1] (dynamic per-token) or [1, 1] (static per-tensor)
  w_packed int8 [K/2, N] (weights [in, out] packed along K),  w_scale f32 [1, N]
  result out_dtype [M, N], or the exact int32 accumulator (return_int32=True)

Kernel (one CTA per [block_m, block_n] output tile; grid (M / block_m, N / block_n)):
  memory warpgroup   TMA copies of the K steps of x and of the K-major weight tile, `stages` deep
                     (plgpu.emit_pipeline_warp_specialized)
  compute warpgroup  per K step of block_k codes (block_k / 2 packed bytes): unpack in registers to
                     int8 (Hopper has no int4 MMA; Mosaic has no 8-bit arithmetic, so shifts run in int16),
                     store the codes to shared memory, and run two int8 x int8 -> int32 wgmmas,
                         acc += lo(x) . lo(w) + hi(x) . hi(w)
                     where lo / hi are the codes at even / odd k (the dot product is a sum over k, so the
                     nibble interleave is never rebuilt). For W4A8, x enters as int16 words holding the
                     code pair (2j, 2j+1) (a bitcast of the int8 array), and lo / hi are its two bytes.
                     Epilogue: float32(acc) * x_scale[m] * w_scale[n] (this order, as the references),
                     cast to out_dtype, stored through shared memory by TMA.
int8 wgmma needs both operands K-major in shared memory, so the weights enter transposed, [N, K/2] (the
same bytes per (n, k-pair); pass w_transposed=True to hand them so, or the wrapper transposes them per
call). The accumulator is exact: |acc| <= 64 K (W4A4), 1016 K (W4A8), far below 2^31; float32(acc) is
exact while |acc| < 2^24 (the Triton kernels' bounds). Shapes are zero-padded to tile multiples (zero
codes add nothing) and the result sliced back. Off the GPU the kernel runs in GPU interpret mode
(pallas_kernels._mgpu: what differs there).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _mgpu
from pallas_kernels._common import pad_axis, round_up

MEMORY_REGISTERS = 40  # registers per thread of the TMA warpgroup (jax's Hopper matmul uses the same)


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    block_m: int  # rows per CTA: 64 or 128 (wgmma M is 64 per instruction)
    block_n: int  # columns per CTA: multiple of 8, <= 256
    block_kh: int  # packed bytes of K per pipeline step (block_k / 2): 64 or 128 (= the swizzle)
    stages: int  # TMA pipeline depth


def smem_bytes(cfg: GemmConfig, x_itemsize: int, out_itemsize: int) -> int:
    """Shared memory of one CTA: the TMA stages, the four unpacked-code tiles, the output tile, scales."""
    bm, bn, bkh = cfg.block_m, cfg.block_n, cfg.block_kh
    stage = (bm * x_itemsize + bn) * bkh
    return cfg.stages * stage + 2 * (bm + bn) * bkh + bm * bn * out_itemsize + 4 * (bm + bn)


def gemm_config(M: int, N: int, K: int, *, x_itemsize: int = 1, out_itemsize: int = 2, block_m=None, block_n=None,
                block_k=None, stages=None) -> GemmConfig:
    """Tile sizes for an [M, K] x [K, N] product (K in codes); None picks a default.

    block_m: 64 for M <= 64 (decode and small batches: one wgmma row group, less padding), else 128.
    block_n: 64 for M <= 64 (more CTAs when there are few rows), else 128; never above N rounded up to 8.
    block_k: 256 codes (128 packed bytes, 128-byte swizzle) when K >= 256, else 128.
    stages: as many as fit in shared memory, at most 4 and at most the number of K steps.
    """
    bm = block_m or (64 if M <= 64 else 128)
    bn = block_n or min(64 if M <= 64 else 128, round_up(N, 8))
    bk = block_k or (256 if K >= 256 else 128)
    if bm not in (64, 128) or bn % 8 or not 8 <= bn <= 256 or bk not in (128, 256):
        raise ValueError(f"unsupported tile ({bm}, {bn}, {bk}): block_m 64|128, block_n 8..256 step 8, "
                         "block_k 128|256")
    nk = -(-round_up(K, bk) // bk)
    if stages is None:
        stages = min(4, nk)
        while stages > 1 and smem_bytes(GemmConfig(bm, bn, bk // 2, stages), x_itemsize, out_itemsize) > _mgpu.SMEM_BUDGET:
            stages -= 1
    return GemmConfig(bm, bn, bk // 2, max(1, stages))


def _gemm_kernel(x_g, w_g, xs_g, ws_g, o_g, xlo, xhi, wlo, whi, o_s, xs_s, ws_s, bar, *, cfg: GemmConfig,
                 unpack_x, nk: int, scaled: bool, interpreting: bool):
    bm, bn, bkh = cfg.block_m, cfg.block_n, cfg.block_kh
    mi, ni = lax.axis_index("m"), lax.axis_index("n")
    rows, cols = pl.ds(mi * bm, bm), pl.ds(ni * bn, bn)

    def compute_context(eval_pipeline):
        if scaled:  # the epilogue's scales arrive while the K loop runs
            plgpu.copy_gmem_to_smem(xs_g.at[rows], xs_s, bar.at[0])
            plgpu.copy_gmem_to_smem(ws_g.at[cols], ws_s, bar.at[1])

        @functools.partial(pl.run_scoped, acc=plgpu.ACC((bm, bn), jnp.int32))
        def _(acc):
            eval_pipeline(acc)
            if scaled:
                plgpu.barrier_wait(bar.at[0])
                plgpu.barrier_wait(bar.at[1])
                xs = _mgpu.load_hinted(xs_s, _mgpu.row_vector_layout(), interpreting)
                ws = _mgpu.load_hinted(ws_s, _mgpu.col_vector_layout(), interpreting)
                y = acc[...].astype(jnp.float32) * lax.broadcast_in_dim(xs, (bm, bn), (0,))
                o_s[...] = (y * lax.broadcast_in_dim(ws, (bm, bn), (1,))).astype(o_s.dtype)
            else:
                o_s[...] = acc[...]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, o_g.at[rows, cols])
            plgpu.wait_smem_to_gmem(0)

    def step(_, x_s, w_s, acc):
        lo, hi = unpack_x(x_s[...])
        xlo[...] = lo
        xhi[...] = hi
        lo, hi = _mgpu.nibbles(w_s[...])
        _mgpu.store_transposable(wlo, lo, interpreting)
        _mgpu.store_transposable(whi, hi, interpreting)
        plgpu.commit_smem()  # the register stores must be visible to wgmma (the async proxy)
        plgpu.wgmma(acc, xlo, _mgpu.transposed_view(wlo, interpreting))
        plgpu.wgmma(acc, xhi, _mgpu.transposed_view(whi, interpreting))
        plgpu.wgmma_wait(0)  # the code tiles are rewritten by the next step
        return acc

    x_item = jnp.dtype(x_g.dtype).itemsize
    pipeline = plgpu.emit_pipeline_warp_specialized(
        step, grid=(nk,), memory_registers=MEMORY_REGISTERS, wg_axis="wg", num_compute_wgs=1,
        max_concurrent_steps=cfg.stages, compute_context=compute_context,
        in_specs=[plgpu.BlockSpec((bm, bkh), lambda k: (0, k), transforms=_mgpu.swizzled(bkh * x_item, x_item)),
                  plgpu.BlockSpec((bn, bkh), lambda k: (0, k), transforms=_mgpu.swizzled(bkh, 1))])
    pipeline(x_g.at[rows], w_g.at[cols])


def int_gemm_mgpu(x, xs, wt, ws, *, unpack_x, out_dtype, cfg: GemmConfig, params, name: str):
    """The pallas call on padded operands: x [Mp, Kh] (int8 packed codes or int16 code pairs), xs f32
    [Mp], wt int8 [Np, Kh] (K-major packed weights), ws f32 [Np]; returns [Mp, Np] out_dtype (int32:
    the raw accumulator, scales unused). params: InterpretGPUParams, or None to compile."""
    Mp, Kh = x.shape
    Np = wt.shape[0]
    bm, bn, bkh = cfg.block_m, cfg.block_n, cfg.block_kh
    interpreting = params is not None
    if interpreting:
        _mgpu.install_thread_compile_cache()
    code_tile = functools.partial(plgpu.SMEM, dtype=jnp.int8, transforms=_mgpu.swizzled(bkh, 1))
    scratch = dict(
        xlo=code_tile((bm, bkh)), xhi=code_tile((bm, bkh)),
        wlo=_mgpu.transposable_scratch(bn, bkh, jnp.int8, interpreting),
        whi=_mgpu.transposable_scratch(bn, bkh, jnp.int8, interpreting),
        o_s=plgpu.SMEM((bm, bn), out_dtype), xs_s=plgpu.SMEM((bm,), jnp.float32), ws_s=plgpu.SMEM((bn,), jnp.float32),
        bar=plgpu.Barrier(num_barriers=2))
    kernel = functools.partial(_gemm_kernel, cfg=cfg, unpack_x=unpack_x, nk=Kh // bkh,
                               scaled=jnp.dtype(out_dtype) != jnp.int32, interpreting=interpreting)
    call = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((Mp, Np), out_dtype), grid=(Mp // bm, Np // bn),
                        grid_names=("m", "n"), num_threads=2, thread_name="wg", scratch_types=scratch,
                        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
                        interpret=params if interpreting else False, kernel_name=name)
    return call(x, wt, xs, ws)


def _run(x, x_scale, w_packed, w_scale, out_dtype, return_int32, w_transposed, tiles, interpret, *, a_bits: int):
    M = x.shape[0]
    K = 2 * x.shape[1] if a_bits == 4 else x.shape[1]
    wt = w_packed.astype(jnp.int8) if w_transposed else w_packed.astype(jnp.int8).T
    N, Kh = wt.shape
    if 2 * Kh != K:
        raise ValueError(f"K mismatch: x {x.shape} ({a_bits}-bit) vs packed w {w_packed.shape} "
                         f"(w_transposed={w_transposed})")
    out_dtype = jnp.int32 if return_int32 else out_dtype
    cfg = gemm_config(M, N, K, x_itemsize=1 if a_bits == 4 else 2, out_itemsize=jnp.dtype(out_dtype).itemsize,
                      **dict(tiles))
    bm, bn, bkh = cfg.block_m, cfg.block_n, cfg.block_kh
    if a_bits == 4:
        xg, unpack_x = pad_axis(pad_axis(x.astype(jnp.int8), 0, bm), 1, bkh), _mgpu.nibbles
    else:
        xg = _mgpu.int8_pairs_as_int16(pad_axis(pad_axis(x.astype(jnp.int8), 0, bm), 1, 2 * bkh))
        unpack_x = _mgpu.bytes_of_int16
    wt = pad_axis(pad_axis(wt, 0, bn), 1, bkh)
    xs = pad_axis(jnp.broadcast_to(jnp.asarray(x_scale, jnp.float32).reshape(-1), (M,)), 0, bm)
    ws = pad_axis(jnp.asarray(w_scale, jnp.float32).reshape(-1), 0, bn)
    y = int_gemm_mgpu(xg, xs, wt, ws, unpack_x=unpack_x, out_dtype=out_dtype, cfg=cfg,
                      params=_mgpu.interpret_params(interpret), name=f"w4a{a_bits}_matmul_mgpu")
    return y[:M, :N]


_STATIC = ("out_dtype", "return_int32", "w_transposed", "block_m", "block_n", "block_k", "stages", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def w4a4_matmul_mgpu(x_packed, x_scale, w_packed, w_scale, out_dtype=jnp.bfloat16, *, return_int32: bool = False,
                     w_transposed: bool = False, block_m=None, block_n=None, block_k=None, stages=None, interpret=None):
    """W4A4 GEMM on Mosaic GPU; the arguments and result of gemm_w4a4.w4a4_matmul (see the module docstring).

    w_transposed: w_packed is given as [N, K/2] (w_packed.T, e.g. stored so once) instead of [K/2, N].
    block_m / block_n / block_k (codes) / stages: gemm_config's. interpret: None (on the CPU only), a bool,
    or an InterpretGPUParams (e.g. with detect_races=True).
    """
    tiles = (("block_m", block_m), ("block_n", block_n), ("block_k", block_k), ("stages", stages))
    return _run(x_packed, x_scale, w_packed, w_scale, out_dtype, return_int32, w_transposed, tiles, interpret,
                a_bits=4)


@functools.partial(jax.jit, static_argnames=_STATIC)
def w4a8_matmul_mgpu(x, x_scale, w_packed, w_scale, out_dtype=jnp.bfloat16, *, return_int32: bool = False,
                     w_transposed: bool = False, block_m=None, block_n=None, block_k=None, stages=None, interpret=None):
    """W4A8 GEMM on Mosaic GPU; the arguments and result of gemm_w4a8.w4a8_matmul (x int8 [M, K], K even);
    the keywords as for w4a4_matmul_mgpu."""
    if x.shape[1] % 2:
        raise ValueError(f"K must be even, got x {x.shape}")
    tiles = (("block_m", block_m), ("block_n", block_n), ("block_k", block_k), ("stages", stages))
    return _run(x, x_scale, w_packed, w_scale, out_dtype, return_int32, w_transposed, tiles, interpret, a_bits=8)
