"""W4A4 / W4A8 GEMM on Mosaic GPU, run on the CPU in Pallas' GPU interpret mode with the race detector.

The interpreter simulates the kernel's warpgroups as threads, its TMA copies, barriers and shared memory
(pallas_kernels._mgpu: the two things it does differently from the GPU). Checked against independent
numpy references and the Triton kernels' jnp references:
  * int32 accumulators: bit-exact against a numpy int64 matmul of the unpacked codes.
  * float32 epilogue: float32(acc) * x_scale * w_scale in the references' order, so at most 1 ulp
    (rtol 2.4e-7) from numpy doing the same, and equal to the jnp reference.
  * bf16 output (the default): one more rounding, relative 2^-8.
  * no race reported by the interpreter's race detector (detect_races=True) in any kernel run; a
    deliberately unsynchronized kernel shows that the detector is on.
Shapes are not tile multiples (M, N, K all padded), several grid points and K steps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _mgpu, pack_int4, w4a4_matmul_ref, w4a8_matmul_ref
from pallas_kernels.gemm_mgpu import gemm_config, smem_bytes, w4a4_matmul_mgpu, w4a8_matmul_mgpu

RACES = _mgpu.gpu_interpret_params(detect_races=True)


def run(fn, *args, **kw):
    """fn(*args, interpret=RACES, **kw) as numpy, asserting the race detector found nothing."""
    out = np.asarray(fn(*args, interpret=RACES, **kw))
    assert not _mgpu.races_found(), "the GPU interpreter reported a race"
    return out


def _scales(rng, M, N, per_token):
    xs = rng.uniform(0.01, 0.1, (M, 1) if per_token else (1, 1)).astype(np.float32)
    return xs, rng.uniform(0.01, 0.1, (1, N)).astype(np.float32)


def _np_epilogue(acc, xs, ws):
    return (acc.astype(np.float32) * xs) * ws


def _check_float(y, acc, xs, ws, dtype):
    expected = _np_epilogue(acc, xs, ws)
    if dtype == jnp.float32:  # same float32 operations in the same order: <= 1 ulp
        np.testing.assert_allclose(y, expected, rtol=2.4e-7, atol=0)
    else:  # one extra rounding to bf16 (8 significant bits)
        assert y.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=2 ** -8, atol=1e-30)


# (M, K, N, tiles): block_m 64 -> 2 row tiles for M = 70, block_n 64 -> 2 column tiles for N = 72, block_k
# 128 -> 2 K steps for K = 160; the second case uses the default tiles (one 256-code K step, stages 1)
W4A4_CASES = [(70, 160, 72, {"block_m": 64, "block_n": 64, "block_k": 128}), (1, 256, 40, {})]


@pytest.mark.parametrize("M,K,N,tiles", W4A4_CASES)
def test_w4a4_mgpu_exact_and_epilogues(M, K, N, tiles):
    rng = np.random.default_rng(M + K + N)
    qx, qw = rng.integers(-8, 8, (M, K)), rng.integers(-8, 8, (K, N))
    xp, wp = pack_int4(qx, axis=-1), pack_int4(qw, axis=0)
    xs, ws = _scales(rng, M, N, per_token=M > 1)  # M = 1: a static per-tensor [1, 1] scale
    acc = run(w4a4_matmul_mgpu, xp, xs, wp, ws, return_int32=True, **tiles)
    expected = qx @ qw  # numpy int64
    np.testing.assert_array_equal(acc, expected)
    np.testing.assert_array_equal(acc, np.asarray(w4a4_matmul_ref(xp, xs, wp, ws, return_int32=True)))
    y = run(w4a4_matmul_mgpu, xp, xs, wp, ws, out_dtype=jnp.float32, **tiles)
    _check_float(y, expected, xs, ws, jnp.float32)
    np.testing.assert_array_equal(y, np.asarray(w4a4_matmul_ref(xp, xs, wp, ws, out_dtype=jnp.float32)))
    _check_float(run(w4a4_matmul_mgpu, xp, xs, wp, ws, **tiles), expected, xs, ws, jnp.bfloat16)


@pytest.mark.parametrize("M,K,N,static", [(70, 160, 72, False), (5, 128, 24, True)])
def test_w4a8_mgpu_exact_and_epilogues(M, K, N, static):
    rng = np.random.default_rng(M * K + N)
    qx, qw = rng.integers(-128, 128, (M, K)), rng.integers(-8, 8, (K, N))
    x, wp = jnp.asarray(qx, jnp.int8), pack_int4(qw, axis=0)
    xs, ws = _scales(rng, M, N, per_token=not static)
    tiles = {"block_m": 64, "block_n": 64, "block_k": 128}
    acc = run(w4a8_matmul_mgpu, x, xs, wp, ws, return_int32=True, **tiles)
    np.testing.assert_array_equal(acc, qx @ qw)
    dtype = jnp.bfloat16 if static else jnp.float32
    y = run(w4a8_matmul_mgpu, x, xs, wp, ws, out_dtype=dtype, **tiles)
    _check_float(y, qx @ qw, xs, ws, dtype)
    r = np.asarray(w4a8_matmul_ref(x, xs, wp, ws, out_dtype=dtype))
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(r, np.float32))


def test_transposed_weights_same_result():
    """w_transposed=True (weights stored [N, K/2] once) gives what the per-call transpose gives."""
    rng = np.random.default_rng(3)
    qx, qw = rng.integers(-8, 8, (9, 128)), rng.integers(-8, 8, (128, 16))
    xp, wp = pack_int4(qx, axis=-1), pack_int4(qw, axis=0)
    acc = run(w4a4_matmul_mgpu, xp, np.ones((9, 1), np.float32), wp.T, np.ones((1, 16), np.float32),
              return_int32=True, w_transposed=True)
    np.testing.assert_array_equal(acc, qx @ qw)


def test_race_detector_is_on():
    """A kernel whose two warpgroups touch one shared-memory buffer without a barrier is reported."""
    def kernel(x_g, o_g, s):
        wg = lax.axis_index("wg")

        @pl.when(wg == 0)
        def _():
            s[...] = x_g[...] + 1.0

        @pl.when(wg == 1)
        def _():
            o_g[...] = s[...]

    _mgpu.install_thread_compile_cache()
    f = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((128,), jnp.float32), num_threads=2, thread_name="wg",
                     scratch_types=dict(s=plgpu.SMEM((128,), jnp.float32)), interpret=RACES)
    jax.block_until_ready(jax.jit(f)(jnp.zeros((128,), jnp.float32)))
    assert _mgpu.races_found()


def test_gemm_config_tiles():
    assert gemm_config(1, 4096, 4096) == gemm_config(64, 4096, 4096)  # decode: 64-row tiles
    assert gemm_config(16, 40, 128).block_n == 40  # never wider than N rounded up to 8
    for M, K, N in [(2048, 4096, 4096), (2048, 14336, 4096), (16, 4096, 14336), (8192, 4096, 4096)]:
        for x_item in (1, 2):  # W4A4, W4A8 (int16 code pairs)
            c = gemm_config(M, N, K, x_itemsize=x_item)
            assert (c.block_m, c.block_kh) == ((64 if M <= 64 else 128), 128) and c.stages >= 2, c
            assert smem_bytes(c, x_item, 2) <= _mgpu.SMEM_BUDGET
    with pytest.raises(ValueError):
        gemm_config(64, 64, 128, block_k=64)


@pytest.mark.slow
@pytest.mark.parametrize("M,K,N", [(200, 1024, 136), (130, 576, 264)])
def test_mgpu_gemms_larger(M, K, N):
    rng = np.random.default_rng(M + N)
    qx4, qx8, qw = rng.integers(-8, 8, (M, K)), rng.integers(-128, 128, (M, K)), rng.integers(-8, 8, (K, N))
    wp, xs, ws = pack_int4(qw, axis=0), *_scales(rng, M, N, per_token=True)
    np.testing.assert_array_equal(run(w4a4_matmul_mgpu, pack_int4(qx4, axis=-1), xs, wp, ws, return_int32=True),
                                  qx4 @ qw)
    y = run(w4a8_matmul_mgpu, jnp.asarray(qx8, jnp.int8), xs, wp, ws)
    _check_float(y, qx8 @ qw, xs, ws, jnp.bfloat16)
