"""Shared helpers for the Pallas kernels: interpret-mode default, block sizes, padding, rounding.

Every kernel in this package is written so that its Triton (GPU) lowering is plausible: in-kernel
tensors have power-of-two shapes, matmul operands have every dimension >= 16 (Triton's `tl.dot`
minimum), there is no scratch memory, and reductions over the contraction axis run as a
`lax.fori_loop` inside one program rather than across grid steps. The wrappers pad inputs to block
multiples and slice results, so callers may pass any shape.

On GPU every pallas_call passes `triton_params()`: since jax 0.10 Pallas lowers a call without
compiler_params through Mosaic GPU, which stages whole blocks in shared memory (the GEMMs' full-K
blocks overflow it) and deprecates `pl.pallas_call`. `tests/pallas_kernels/test_gpu_lowering.py`
lowers every kernel for CUDA on the CPU to check that the Triton lowering accepts them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MIN_DOT = 16  # smallest M/N/K a Triton dot accepts


def triton_params(num_warps: int | None = None, num_stages: int | None = None):
    """The compiler_params every kernel passes: select the Triton lowering (not Mosaic GPU) on GPU.
    Ignored in interpret mode. None keeps Triton's defaults (4 warps, 3 stages)."""
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def default_warps(tile_elems: int, num_warps: int | None = None) -> int | None:
    """num_warps if given, else 8 for tiles of >= 128 x 128 elements, else None (Triton's 4).

    Compiled offline for sm_90 (pallas_kernels.sm90_check), the 128 x 128 x 256 W4A4 / W4A8 GEMM tile
    needs 255 registers per thread and spills 1.2 KB / 0.9 KB of stack with 4 warps; with 8 warps it
    uses 240 / 227 registers and spills nothing. The K = 14336 rotate_quant tile (128 x 128) likewise.
    """
    if num_warps is not None:
        return num_warps
    return 8 if tile_elems >= 128 * 128 else None


def resolve_interpret(interpret: bool | None) -> bool:
    """None -> True exactly when JAX's default backend is the CPU (Pallas cannot compile there)."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return bool(interpret)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def row_block(m: int, cap: int = 64, floor: int = MIN_DOT) -> int:
    """A power-of-two block for a dimension of length m: next_pow2(m) clamped to [floor, cap]."""
    return max(floor, min(cap, next_pow2(m)))


def pad_axis(x, axis: int, multiple: int, value=0):
    """Zero-pad (or `value`-pad) `axis` of x up to a multiple of `multiple`; no copy when aligned."""
    n = x.shape[axis]
    target = round_up(n, multiple)
    if target == n:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, target - n)
    return jnp.pad(x, widths, constant_values=value)


def pad_to(x, axis: int, size: int):
    """Zero-pad `axis` of x to exactly `size` (>= its length)."""
    n = x.shape[axis]
    if size == n:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - n)
    return jnp.pad(x, widths)


def round_half_even(y):
    """jnp.round (ties to even) from floor/compare/select only, for float32 y.

    The Pallas Triton lowering has no rule for `lax.round`, so kernels use this. Exact: y - floor(y)
    is exact in float32, so ties are detected exactly and the result equals jnp.round(y) bit for bit.
    """
    r = jnp.floor(y)
    d = y - r
    odd = (r - 2.0 * jnp.floor(r * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return jnp.where(up, r + 1.0, r)


def unpack_lo_hi(b):
    """int8 bytes -> (low nibble, high nibble) as sign-extended int8 codes in [-8, 7] (int4.py layout)."""
    lo = jnp.right_shift(jnp.left_shift(b, 4), 4)
    hi = jnp.right_shift(b, 4)
    return lo, hi


def unpack_lo_hi_unsigned(b):
    """int8 bytes -> (low nibble, high nibble) as unsigned codes in [0, 15], dtype int8."""
    return b & 0xF, jnp.right_shift(b, 4) & 0xF


def pack_lo_hi(lo, hi):
    """Inverse of unpack_lo_hi for int8 codes: byte = (lo & 0xF) | (hi << 4)."""
    return (lo & 0xF) | jnp.left_shift(hi, 4)


def tiled_matmul_call(kernel, x, w, *, rows=(), cols=(), block_m: int, block_n: int, kx_multiple: int,
                      kw_multiple: int, out_dtype, name: str, interpret: bool, num_warps: int | None = None,
                      num_stages: int | None = None):
    """The pallas_call shared by the GEMM/GEMV kernels: one program per [block_m, block_n] output tile.

    x [M, Kx] and w [Kw, N] are zero-padded to (block_m, kx_multiple) and (kw_multiple, block_n); each
    program sees x's full (padded) K for its rows and w's full K for its columns, and loops over K
    itself. `rows`: per-row operands [M, r] (e.g. activation scales), blocked (block_m, r); `cols`:
    per-column operands [c, N] (e.g. weight scales), blocked (c, block_n). The kernel is called as
    kernel(x_ref, w_ref, *row_refs, *col_refs, o_ref). Returns the [M, N] result (padding sliced off).
    num_warps / num_stages: Triton's (GPU only; None: triton_params' defaults).
    """
    M, N = x.shape[0], w.shape[1]
    x = pad_axis(pad_axis(x, 0, block_m), 1, kx_multiple)
    w = pad_axis(pad_axis(w, 0, kw_multiple), 1, block_n)
    rows = [pad_axis(r, 0, block_m) for r in rows]
    cols = [pad_axis(c, 1, block_n) for c in cols]
    Mp, Np = x.shape[0], w.shape[1]
    in_specs = ([pl.BlockSpec((block_m, x.shape[1]), lambda i, j: (i, 0)),
                 pl.BlockSpec((w.shape[0], block_n), lambda i, j: (0, j))]
                + [pl.BlockSpec((block_m, r.shape[1]), lambda i, j: (i, 0)) for r in rows]
                + [pl.BlockSpec((c.shape[0], block_n), lambda i, j: (0, j)) for c in cols])
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((Mp, Np), out_dtype),
        grid=(Mp // block_m, Np // block_n),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=triton_params(num_warps, num_stages),
        name=name,
    )(x, w, *rows, *cols)
    return out[:M, :N]


def gemm_blocks(M: int, N: int, K: int, block_m, block_n, block_k, cap_m: int = 128, cap_n: int = 128,
                cap_k: int = 256):
    """Default (block_m, block_n, block_k): powers of two clamped to [16, cap]; block_k (in int4 codes) even."""
    bm = block_m or row_block(M, cap=cap_m)
    bn = block_n or row_block(N, cap=cap_n)
    bk = block_k or row_block(K, cap=cap_k, floor=32)
    if bk % 2:
        raise ValueError(f"block_k must be even, got {bk}")
    return bm, bn, bk


def int_gemm_program(pairs, nk: int, xs_ref, ws_ref, o_ref, return_int32: bool) -> None:
    """Body of one int GEMM program: acc = sum over k < nk of the int8 dots in pairs(k) (a list of
    (x_codes, w_codes)), int32 accumulation; then o = acc (return_int32) or acc * x_scale * w_scale."""
    def body(k, acc):
        for xk, wk in pairs(k):
            acc = acc + jnp.dot(xk, wk, preferred_element_type=jnp.int32)
        return acc

    acc = jax.lax.fori_loop(0, nk, body, jnp.zeros(o_ref.shape, jnp.int32))
    if return_int32:
        o_ref[...] = acc
    else:
        o_ref[...] = (acc.astype(jnp.float32) * xs_ref[...] * ws_ref[...]).astype(o_ref.dtype)


def gemm_scales(x_scale, w_scale, M: int, N: int):
    """(x_scale as f32 [M, 1] from [M, 1] or [1, 1], w_scale as f32 [1, N])."""
    xs = jnp.broadcast_to(jnp.asarray(x_scale, jnp.float32).reshape(-1, 1), (M, 1))
    return xs, jnp.asarray(w_scale, jnp.float32).reshape(1, N)
