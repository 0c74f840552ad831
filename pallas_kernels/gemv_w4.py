"""Weight-only W4 GEMV/skinny GEMM for decode: float activations x packed int4 weights.

    y[m, n] = sum_k x[m, k] * qw[k, n] * s[k // g, n]

Shapes / dtypes / layout:
  x         bf16 or f32 [M, K]   (decode: M <= 16; larger M works, tiled by block_m), K even
  w_packed  int8 [K/2, N]        int4 codes [in, out] packed along K (axis 0), pallas_kernels.int4 layout
  w_scale   f32  [1, N]          per output channel, or [K/g, N] per group of g = K / rows along K
  result    out_dtype (default x.dtype) [M, N]

Grid: N / block_n programs only (M fits one block for decode), so every packed weight byte is read
from memory exactly once; activations are tiny and re-read per program. Each program loops over K:
the weight block's nibbles become codes in x's dtype (exact: |code| <= 8), activations are read with
stride 2 (even columns meet low nibbles, odd columns high nibbles) and two dots accumulate in f32.
With group scales the K block is one group and the partial sum is scaled before accumulation;
with a per-channel scale the scale is applied once in the epilogue.

M is padded to >= 16 rows (Triton's dot minimum); padding rows are zeros and are sliced off.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import cdiv, resolve_interpret, row_block, tiled_matmul_call, unpack_lo_hi
from pallas_kernels.int4 import unpack_int4


def _gemv_kernel(x_ref, w_ref, s_ref, o_ref, *, bk: int, nk: int, grouped: bool):
    bm, bn = o_ref.shape
    bkh = bk // 2
    cdt = x_ref.dtype

    def body(k, acc):
        start = pl.multiple_of(k * bk, bk)
        x_even = x_ref[:, pl.ds(start, bkh, stride=2)]
        x_odd = x_ref[:, pl.ds(start + 1, bkh, stride=2)]
        w_lo, w_hi = unpack_lo_hi(w_ref[pl.ds(pl.multiple_of(k * bkh, bkh), bkh), :])
        part = jnp.dot(x_even, w_lo.astype(cdt), preferred_element_type=jnp.float32)
        part = part + jnp.dot(x_odd, w_hi.astype(cdt), preferred_element_type=jnp.float32)
        if grouped:
            part = part * s_ref[pl.ds(k, 1), :]
        return acc + part

    acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
    if not grouped:
        acc = acc * s_ref[...]
    o_ref[...] = acc.astype(o_ref.dtype)


def check_gemv_args(x, w_packed, w_scale):
    """(M, K, N, float32 scales) of a W4 GEMV call, or ValueError: x [M, K], packed w [K/2, N], scales [1 | K/g, N]."""
    M, K = x.shape
    Kh, N = w_packed.shape
    if K != 2 * Kh:
        raise ValueError(f"K mismatch: x {x.shape} vs packed w {w_packed.shape}")
    s = jnp.asarray(w_scale, jnp.float32)
    if s.ndim != 2 or s.shape[1] != N or K % s.shape[0]:
        raise ValueError(f"w_scale must be [1, N] or [K/g, N]; got {s.shape} for K={K}, N={N}")
    return M, K, N, s


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_n", "block_k", "block_m", "interpret", "num_warps",
                                             "num_stages"))
def gemv_w4(x, w_packed, w_scale, out_dtype=None, *, block_n: int | None = None, block_k: int | None = None,
            block_m: int | None = None, interpret: bool | None = None, num_warps: int | None = None,
            num_stages: int | None = None):
    """y = x @ dequant(w_packed, w_scale), [M, N] in out_dtype (default x.dtype), f32 accumulation.

    w_scale [1, N] is per output channel; [G, N] with G > 1 means groups of K // G rows along K
    (block_k is then fixed to the group size, which must be even).
    """
    M, K, N, s = check_gemv_args(x, w_packed, w_scale)
    grouped = s.shape[0] > 1
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if x.dtype not in (jnp.bfloat16, jnp.float32, jnp.float16):
        x = x.astype(jnp.float32)
    bm = block_m or row_block(M, cap=16)
    bn = block_n or row_block(N, cap=64)
    if grouped:
        bk = K // s.shape[0]
        if bk % 2:
            raise ValueError(f"group size {bk} must be even")
    else:
        bk = block_k or row_block(K, cap=512, floor=32)
    kernel = functools.partial(_gemv_kernel, bk=bk, nk=cdiv(K, bk), grouped=grouped)
    return tiled_matmul_call(kernel, x, w_packed.astype(jnp.int8), cols=[s], block_m=bm, block_n=bn,
                             kx_multiple=bk, kw_multiple=bk // 2, out_dtype=out_dtype, name="gemv_w4",
                             interpret=resolve_interpret(interpret), num_warps=num_warps, num_stages=num_stages)


def dequantize_w4(w_packed, w_scale):
    """Float32 [K, N] weights from packed codes and a [1, N] or [K/g, N] scale."""
    qw = unpack_int4(w_packed, axis=0).astype(jnp.float32)
    s = jnp.asarray(w_scale, jnp.float32)
    return qw * jnp.repeat(s, qw.shape[0] // s.shape[0], axis=0)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def gemv_w4_ref(x, w_packed, w_scale, out_dtype=None):
    """Plain-jnp reference: dequantize to float32, matmul in float32 (HIGHEST precision)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    w = dequantize_w4(w_packed, w_scale)
    y = jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    return y.astype(out_dtype)
