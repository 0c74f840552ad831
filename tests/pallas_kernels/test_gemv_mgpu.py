"""W4 weight-only GEMV on Mosaic GPU, run on the CPU in Pallas' GPU interpret mode with the race detector.

Against a float64 numpy reference and gemv_w4_ref (the Triton kernel's reference). The kernel computes
with bf16 (or f16) activations, exact int4 codes in the same dtype, products exact in float32 and
float32 accumulation, so the error is the float32 summation error: bounded by 1e-5 * sum_k |x w| for
K <= 512 (a wrong code or scale is O(1) off). A bf16 output adds its rounding (relative 2^-8).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gemv_w4_ref, pack_int4
from pallas_kernels.gemv_mgpu import gemv_tiles, gemv_w4_mgpu
from tests.pallas_kernels.test_gemm_mgpu import run


def _np_dequant(qw, s):
    return qw.astype(np.float64) * np.repeat(s.astype(np.float64), qw.shape[0] // s.shape[0], axis=0)


def _check(y, x, qw, s, out_bf16: bool):
    xf = np.asarray(x, np.float64)  # exactly the values the kernel sees
    w = _np_dequant(qw, s)
    expected = xf @ w
    bound = 1e-5 * (np.abs(xf) @ np.abs(w)) + 1e-7 + (2 ** -8 * np.abs(expected) if out_bf16 else 0)
    err = np.abs(np.asarray(y, np.float64) - expected)
    assert np.all(err <= bound), float(np.max(err - bound))


# (M, K, N, groups, keywords): 2 column tiles (N = 72 -> 128), split-K 2 with 2 K steps each (K = 320 padded
# to 512 at block_k 128); group-128 scales (2 groups, split 2); M = 16 rows with default tiles
CASES = [(3, 320, 72, 1, {"split": 2, "block_k": 128}), (8, 256, 48, 2, {}), (16, 256, 64, 1, {})]


@pytest.mark.parametrize("M,K,N,groups,kw", CASES)
def test_gemv_w4_mgpu(M, K, N, groups, kw):
    rng = np.random.default_rng(M * K + N)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    qw = rng.integers(-8, 8, (K, N))
    s = rng.uniform(0.01, 0.1, (groups, N)).astype(np.float32)
    wp = pack_int4(qw, axis=0)
    y = run(gemv_w4_mgpu, x, wp, s, out_dtype=jnp.float32, **kw)
    assert y.shape == (M, N)
    _check(y, x, qw, s, out_bf16=False)
    np.testing.assert_allclose(y, np.asarray(gemv_w4_ref(x, wp, s, out_dtype=jnp.float32)), rtol=1e-5, atol=1e-5)
    if M == 16:  # default output dtype: x's (bf16)
        yb = run(gemv_w4_mgpu, x, wp, s, **kw)
        assert yb.dtype == jnp.bfloat16
        _check(yb, x, qw, s, out_bf16=True)


def test_gemv_w4_mgpu_f32_input_is_rounded_to_bf16():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    qw = rng.integers(-8, 8, (256, 64))
    s = rng.uniform(0.01, 0.1, (1, 64)).astype(np.float32)
    y = run(gemv_w4_mgpu, jnp.asarray(x), pack_int4(qw, axis=0), s)
    assert y.dtype == jnp.float32
    _check(y, jnp.asarray(x, jnp.bfloat16), qw, s, out_bf16=False)


def test_gemv_tiles():
    assert gemv_tiles(1, 4096, 4096, 1)[:4] == (16, 64, 128, 8)  # 64 column tiles x split 8, 2 K steps each
    assert gemv_tiles(16, 14336, 4096, 32)[:4] == (16, 64, 64, 2)  # group 128: one group per K step
    assert gemv_tiles(40, 4096, 4096, 1)[0] == 64
    for bad in [dict(M=300, groups=1), dict(M=1, groups=64)]:  # > 256 rows; group size 64
        with pytest.raises(ValueError):
            gemv_tiles(bad["M"], 4096, 4096, bad["groups"])
