"""W4A8 GEMM: int8 activations x packed int4 weights, int32 accumulation, scaled epilogue.

    y[m, n] = x_scale[m] * w_scale[n] * sum_k qx[m, k] * qw[k, n]

Shapes / dtypes / layout:
  x        int8 [M, K]      activation codes in [-128, 127] (not packed), K even
  x_scale  f32  [M, 1] (per-token) or [1, 1] (per-tensor)
  w_packed int8 [K/2, N]    int4 weights [in, out] packed along K (axis 0), pallas_kernels.int4 layout
  w_scale  f32  [1, N]
  result   out_dtype [M, N], or the exact int32 accumulator with return_int32=True

The weight nibbles are unpacked to int8 in the kernel; instead of interleaving them back, the
activations are read with stride 2 (even columns pair with low nibbles, odd with high ones):
    qx . qw = qx[:, 0::2] . lo(w_bytes) + qx[:, 1::2] . hi(w_bytes).
The accumulator is exact in int32; converting it to float32 is exact while |acc| < 2^24
(guaranteed for K <= 16512 since |acc| <= 1016 K).

Grid (M / block_m, N / block_n), K loop inside; zero padding to block multiples, result sliced back.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import (cdiv, default_warps, gemm_blocks, gemm_scales, int_gemm_program,
                                    resolve_interpret, tiled_matmul_call, unpack_lo_hi)
from pallas_kernels.int4 import unpack_int4


def _w4a8_kernel(x_ref, w_ref, xs_ref, ws_ref, o_ref, *, bk: int, nk: int, return_int32: bool):
    bkh = bk // 2

    def pairs(k):
        start = pl.multiple_of(k * bk, bk)
        x_even = x_ref[:, pl.ds(start, bkh, stride=2)]
        x_odd = x_ref[:, pl.ds(start + 1, bkh, stride=2)]
        w_lo, w_hi = unpack_lo_hi(w_ref[pl.ds(pl.multiple_of(k * bkh, bkh), bkh), :])
        return [(x_even, w_lo), (x_odd, w_hi)]

    int_gemm_program(pairs, nk, xs_ref, ws_ref, o_ref, return_int32)


@functools.partial(jax.jit, static_argnames=("out_dtype", "return_int32", "block_m", "block_n", "block_k",
                                             "interpret", "num_warps", "num_stages"))
def w4a8_matmul(x, x_scale, w_packed, w_scale, out_dtype=jnp.bfloat16, *, return_int32: bool = False,
                block_m: int | None = None, block_n: int | None = None, block_k: int | None = None,
                interpret: bool | None = None, num_warps: int | None = None, num_stages: int | None = None):
    """y = (x @ unpack(w_packed)) * x_scale * w_scale, [M, N] in out_dtype.

    x int8 [M, K], x_scale f32 [M, 1] or [1, 1], w_packed int8 [K/2, N], w_scale f32 [1, N].
    return_int32=True returns the exact int32 accumulator [M, N] (scales ignored).
    """
    M, K = x.shape
    Kh, N = w_packed.shape
    if K != 2 * Kh:
        raise ValueError(f"K mismatch: x {x.shape} vs packed w {w_packed.shape}")
    bm, bn, bk = gemm_blocks(M, N, K, block_m, block_n, block_k)
    xs, ws = gemm_scales(x_scale, w_scale, M, N)
    kernel = functools.partial(_w4a8_kernel, bk=bk, nk=cdiv(K, bk), return_int32=return_int32)
    return tiled_matmul_call(kernel, x.astype(jnp.int8), w_packed.astype(jnp.int8), rows=[xs], cols=[ws],
                             block_m=bm, block_n=bn, kx_multiple=bk, kw_multiple=bk // 2,
                             out_dtype=jnp.int32 if return_int32 else out_dtype, name="w4a8_matmul",
                             interpret=resolve_interpret(interpret), num_warps=default_warps(bm * bn, num_warps),
                             num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=("out_dtype", "return_int32"))
def w4a8_matmul_ref(x, x_scale, w_packed, w_scale, out_dtype=jnp.bfloat16, *, return_int32: bool = False):
    """Plain-jnp reference: int32 matmul of x and unpack_int4(w_packed, axis=0), same epilogue order."""
    qw = unpack_int4(w_packed, axis=0).astype(jnp.int32)
    acc = jnp.dot(x.astype(jnp.int32), qw, preferred_element_type=jnp.int32)
    if return_int32:
        return acc
    xs = jnp.asarray(x_scale, jnp.float32).reshape(-1, 1)
    ws = jnp.asarray(w_scale, jnp.float32).reshape(1, -1)
    return (acc.astype(jnp.float32) * xs * ws).astype(out_dtype)
