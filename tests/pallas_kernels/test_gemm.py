"""W4A4 / W4A8 GEMM and W4 GEMV kernels (CPU interpret mode) against independent numpy references.

Integer paths are compared bit-exactly with a numpy int64 matmul of the unpacked codes. Small block
sizes force several K-loop steps and padding in M, N and K.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    gemv_w4,
    gemv_w4_ref,
    pack_int4,
    w4a4_matmul,
    w4a4_matmul_ref,
    w4a8_matmul,
    w4a8_matmul_ref,
)

SHAPES = [(1, 64, 16), (3, 96, 40), (17, 160, 130)]  # (M, K, N): odd M, N not a block multiple, K % 64 != 0
BLOCKS = {"block_m": 16, "block_n": 32, "block_k": 32}


def _scales(rng, M, N, per_token):
    xs = rng.uniform(0.01, 0.1, (M, 1) if per_token else (1, 1)).astype(np.float32)
    ws = rng.uniform(0.01, 0.1, (1, N)).astype(np.float32)
    return xs, ws


def _np_epilogue(acc, xs, ws):
    """float32(acc) * xs * ws in float32: one rounding per multiply, same order as the kernel."""
    return (acc.astype(np.float32) * xs) * ws


# (M, K, N, epilogue checked besides the int32 accumulator): each compile costs ~1 s in interpret mode
W4A4_CASES = [(*SHAPES[0], None), (*SHAPES[1], "bf16"), (*SHAPES[2], "f32")]


@pytest.mark.parametrize("M,K,N,epilogue", W4A4_CASES)
def test_w4a4_int32_exact_and_epilogue(M, K, N, epilogue):
    rng = np.random.default_rng(M * 1000 + K)
    qx, qw = rng.integers(-8, 8, (M, K)), rng.integers(-8, 8, (K, N))
    xp, wp = pack_int4(qx, axis=-1), pack_int4(qw, axis=0)
    xs, ws = _scales(rng, M, N, per_token=M > 1)
    acc = w4a4_matmul(xp, xs, wp, ws, return_int32=True, **BLOCKS)
    expected = qx @ qw  # independent: numpy int64
    np.testing.assert_array_equal(np.asarray(acc), expected)
    if epilogue == "f32":
        # exact integer -> float32 (|acc| < 2^24), then two float32 multiplies; the kernel does the same
        # operations in the same order, so allow at most 1 ulp (in case XLA reassociates).
        y = w4a4_matmul(xp, xs, wp, ws, out_dtype=jnp.float32, **BLOCKS)
        np.testing.assert_allclose(np.asarray(y), _np_epilogue(expected, xs, ws), rtol=2.4e-7, atol=0)
    elif epilogue == "bf16":
        # default bf16 output: one extra rounding to bf16 (8 mantissa bits) -> relative 2^-8.
        yb = w4a4_matmul(xp, xs, wp, ws, **BLOCKS)
        assert yb.dtype == jnp.bfloat16 and yb.shape == (M, N)
        np.testing.assert_allclose(np.asarray(yb, np.float32), _np_epilogue(expected, xs, ws), rtol=2 ** -8,
                                   atol=1e-30)


def test_w4a4_default_blocks_match_ref():
    """Default block sizes (one K block) and the module's own jnp reference agree exactly."""
    rng = np.random.default_rng(7)
    qx, qw = rng.integers(-8, 8, (5, 128)), rng.integers(-8, 8, (128, 24))
    xp, wp = pack_int4(qx, axis=-1), pack_int4(qw, axis=0)
    xs, ws = _scales(rng, 5, 24, per_token=False)
    a = w4a4_matmul(xp, xs, wp, ws, out_dtype=jnp.float32)
    b = w4a4_matmul_ref(xp, xs, wp, ws, out_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("M,K,N,epilogue", [(*SHAPES[1], False), (*SHAPES[2], True)])
def test_w4a8_int32_exact_and_epilogue(M, K, N, epilogue):
    rng = np.random.default_rng(M * 1000 + K + 1)
    qx, qw = rng.integers(-128, 128, (M, K)), rng.integers(-8, 8, (K, N))
    wp = pack_int4(qw, axis=0)
    xs, ws = _scales(rng, M, N, per_token=True)
    acc = w4a8_matmul(jnp.asarray(qx, jnp.int8), xs, wp, ws, return_int32=True, **BLOCKS)
    expected = qx @ qw
    np.testing.assert_array_equal(np.asarray(acc), expected)
    if epilogue:  # same 1-ulp argument as for W4A4
        y = w4a8_matmul(jnp.asarray(qx, jnp.int8), xs, wp, ws, out_dtype=jnp.float32, **BLOCKS)
        np.testing.assert_allclose(np.asarray(y), _np_epilogue(expected, xs, ws), rtol=2.4e-7, atol=0)
        r = w4a8_matmul_ref(jnp.asarray(qx, jnp.int8), xs, wp, ws, out_dtype=jnp.float32)
        np.testing.assert_allclose(np.asarray(y), np.asarray(r), rtol=2.4e-7, atol=0)


def _np_dequant(qw, s):
    return qw.astype(np.float64) * np.repeat(s.astype(np.float64), qw.shape[0] // s.shape[0], axis=0)


@pytest.mark.parametrize("M,K,N,groups", [(1, 128, 40, 1), (3, 128, 24, 4), (16, 96, 16, 1)])
def test_gemv_w4_f32(M, K, N, groups):
    rng = np.random.default_rng(M + K + N)
    x = rng.standard_normal((M, K)).astype(np.float32)
    qw = rng.integers(-8, 8, (K, N))
    s = rng.uniform(0.01, 0.1, (groups, N)).astype(np.float32)
    y = gemv_w4(jnp.asarray(x), pack_int4(qw, axis=0), s, block_n=16, block_k=32)
    assert y.dtype == jnp.float32 and y.shape == (M, N)
    w = _np_dequant(qw, s)
    expected = x.astype(np.float64) @ w
    # float32 accumulation of K products in a different order than float64: error <= ~K * 2^-24 * sum|x w|;
    # 1e-5 * sum|x||w| is a loose bound for K <= 128 (and catches any wrong code/scale, which is O(1)).
    bound = 1e-5 * (np.abs(x) @ np.abs(w)) + 1e-7
    assert np.all(np.abs(np.asarray(y) - expected) <= bound), np.max(np.abs(np.asarray(y) - expected) - bound)
    np.testing.assert_allclose(np.asarray(y), np.asarray(gemv_w4_ref(jnp.asarray(x), pack_int4(qw, axis=0), s)),
                               rtol=1e-5, atol=1e-5)


def test_gemv_w4_bf16_grouped():
    rng = np.random.default_rng(11)
    M, K, N = 8, 256, 48
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    qw = rng.integers(-8, 8, (K, N))
    s = rng.uniform(0.01, 0.1, (K // 128, N)).astype(np.float32)
    y = gemv_w4(x, pack_int4(qw, axis=0), s)
    assert y.dtype == jnp.bfloat16 and y.shape == (M, N)
    xf = np.asarray(x, np.float64)  # the kernel sees exactly these bf16 values, codes exact, f32 accumulation
    w = _np_dequant(qw, s)
    expected = xf @ w
    # the output is rounded to bf16 (relative 2^-8) on top of the float32 accumulation error
    bound = 2 ** -8 * np.abs(expected) + 1e-5 * (np.abs(xf) @ np.abs(w)) + 1e-6
    err = np.abs(np.asarray(y, np.float64) - expected)
    assert np.all(err <= bound), float(np.max(err - bound))
