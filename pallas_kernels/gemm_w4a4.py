"""W4A4 GEMM: packed int4 activations x packed int4 weights, int32 accumulation, scaled epilogue.

    y[m, n] = x_scale[m] * w_scale[n] * sum_k qx[m, k] * qw[k, n]

Shapes / dtypes / layout (pallas_kernels.int4 layout: low nibble = even index, signed codes in [-8, 7]):
  x_packed  int8 [M, K/2]   activations packed along K (last axis)
  x_scale   f32  [M, 1] (dynamic per-token) or [1, 1] (static per-tensor)
  w_packed  int8 [K/2, N]   weights [in, out] packed along K (axis 0)
  w_scale   f32  [1, N]     per output channel
  result    out_dtype [M, N]  (or the raw int32 accumulator with return_int32=True)

In the kernel both operands are unpacked to int8 and multiplied with int8 x int8 -> int32 dots
(Hopper has no int4 MMA). The nibble interleave is never materialized: since a dot is a sum over K,
    qx . qw = qx[:, 0::2] . qw[0::2, :] + qx[:, 1::2] . qw[1::2, :]
          = lo(x_bytes) . lo(w_bytes) + hi(x_bytes) . hi(w_bytes),
so each K block costs two int8 dots on the unpacked low and high nibbles. The accumulator is exact
(|acc| <= 64 K < 2^24 for K < 262144), so converting it to float32 before scaling loses nothing.

Grid: (M / block_m, N / block_n); each program loops over K in block_k steps. Inputs are zero-padded
to block multiples (zero bytes are zero codes and add nothing), the result is sliced back. Padding
the weight costs a copy per call: callers that care should store weights padded (N to block_n, K to
block_k) once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import (cdiv, default_warps, gemm_blocks, gemm_scales, int_gemm_program,
                                    resolve_interpret, tiled_matmul_call, unpack_lo_hi)
from pallas_kernels.int4 import unpack_int4


def _w4a4_kernel(x_ref, w_ref, xs_ref, ws_ref, o_ref, *, bkh: int, nk: int, return_int32: bool):
    def pairs(k):
        start = pl.multiple_of(k * bkh, bkh)
        x_lo, x_hi = unpack_lo_hi(x_ref[:, pl.ds(start, bkh)])
        w_lo, w_hi = unpack_lo_hi(w_ref[pl.ds(start, bkh), :])
        return [(x_lo, w_lo), (x_hi, w_hi)]

    int_gemm_program(pairs, nk, xs_ref, ws_ref, o_ref, return_int32)


@functools.partial(jax.jit, static_argnames=("out_dtype", "return_int32", "block_m", "block_n", "block_k",
                                             "interpret", "num_warps", "num_stages"))
def w4a4_matmul(x_packed, x_scale, w_packed, w_scale, out_dtype=jnp.bfloat16, *, return_int32: bool = False,
                block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                interpret: bool | None = None, num_warps: int | None = None, num_stages: int | None = None):
    """y = (unpack(x_packed) @ unpack(w_packed)) * x_scale * w_scale, [M, N] in out_dtype.

    x_packed int8 [M, K/2], x_scale f32 [M, 1] or [1, 1], w_packed int8 [K/2, N], w_scale f32 [1, N].
    return_int32=True returns the exact int32 accumulator [M, N] instead (scales ignored).
    Block sizes are powers of two by default (block_k counts int4 codes, i.e. 2x bytes).
    """
    M, Kh = x_packed.shape
    Kh2, N = w_packed.shape
    if Kh != Kh2:
        raise ValueError(f"packed K mismatch: x {x_packed.shape} vs w {w_packed.shape}")
    bm, bn, bk = gemm_blocks(M, N, 2 * Kh, block_m, block_n, block_k)
    bkh = bk // 2
    xs, ws = gemm_scales(x_scale, w_scale, M, N)
    kernel = functools.partial(_w4a4_kernel, bkh=bkh, nk=cdiv(Kh, bkh), return_int32=return_int32)
    return tiled_matmul_call(kernel, x_packed.astype(jnp.int8), w_packed.astype(jnp.int8), rows=[xs], cols=[ws],
                             block_m=bm, block_n=bn, kx_multiple=bkh, kw_multiple=bkh,
                             out_dtype=jnp.int32 if return_int32 else out_dtype, name="w4a4_matmul",
                             interpret=resolve_interpret(interpret), num_warps=default_warps(bm * bn, num_warps),
                             num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=("out_dtype", "return_int32"))
def w4a4_matmul_ref(x_packed, x_scale, w_packed, w_scale, out_dtype=jnp.bfloat16, *, return_int32: bool = False):
    """Plain-jnp reference: unpack with int4.unpack_int4, int32 matmul, same epilogue order as the kernel."""
    qx = unpack_int4(x_packed, axis=-1).astype(jnp.int32)
    qw = unpack_int4(w_packed, axis=0).astype(jnp.int32)
    acc = jnp.dot(qx, qw, preferred_element_type=jnp.int32)
    if return_int32:
        return acc
    xs = jnp.asarray(x_scale, jnp.float32).reshape(-1, 1)
    ws = jnp.asarray(w_scale, jnp.float32).reshape(1, -1)
    return (acc.astype(jnp.float32) * xs * ws).astype(out_dtype)
