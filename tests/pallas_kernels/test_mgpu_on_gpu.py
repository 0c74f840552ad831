"""The compiled Mosaic GPU kernels on a Hopper GPU against numpy (marked gpu: `pytest -m gpu`, skipped elsewhere).

The CPU suite runs them in GPU interpret mode (test_gemm_mgpu.py, test_gemv_mgpu.py); here they run as
compiled Mosaic GPU kernels at the benchmark shapes and at odd ones. Tolerances as in test_on_gpu.py:
int32 accumulators bit-exact (int8 wgmma, int32 accumulation), bf16 outputs within 2^-8 relative; the
GEMV's bf16 wgmma accumulates in f32, so its error is the bf16 rounding of the output.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gemv_w4_mgpu, pack_int4, w4a4_matmul_mgpu, w4a8_matmul_mgpu
from tests.pallas_kernels.test_on_gpu import exact_int_matmul


def _hopper():
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")) == "9.0"


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _hopper(), reason="needs a Hopper (sm_90) GPU")]

GEMM_SHAPES = [(2048, 4096, 4096), (16, 4096, 14336), (1, 4096, 4096), (37, 576, 960), (300, 14336, 512)]


@pytest.mark.parametrize("M,K,N", GEMM_SHAPES)
def test_mgpu_gemms_exact_on_gpu(M, K, N):
    rng = np.random.default_rng(M + K + N)
    qx4, qx8, qw = rng.integers(-8, 8, (M, K)), rng.integers(-128, 128, (M, K)), rng.integers(-8, 8, (K, N))
    wp = pack_int4(qw, axis=0)
    xs = rng.uniform(0.01, 0.1, (M, 1)).astype(np.float32)
    ws = rng.uniform(0.01, 0.1, (1, N)).astype(np.float32)
    for kind, qx, fn, xq in (("w4a4", qx4, w4a4_matmul_mgpu, pack_int4(qx4, axis=-1)),
                             ("w4a8", qx8, w4a8_matmul_mgpu, jnp.asarray(qx8, jnp.int8))):
        expected = exact_int_matmul(qx, qw)
        np.testing.assert_array_equal(np.asarray(fn(xq, xs, wp, ws, return_int32=True)), expected, err_msg=kind)
        y = fn(xq, xs, wp, ws)
        np.testing.assert_allclose(np.asarray(y, np.float32), (expected.astype(np.float32) * xs) * ws,
                                   rtol=2 ** -8, atol=1e-30, err_msg=kind)


@pytest.mark.parametrize("M", [1, 8, 16, 3])
@pytest.mark.parametrize("K,N,group", [(4096, 4096, None), (4096, 14336, 128), (640, 960, 128)])
def test_mgpu_gemv_on_gpu(M, K, N, group):
    rng = np.random.default_rng(M * K)
    qw = rng.integers(-8, 8, (K, N))
    s = rng.uniform(0.01, 0.1, (1 if group is None else K // group, N)).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    y = gemv_w4_mgpu(x, pack_int4(qw, axis=0), s)
    expected = np.asarray(x, np.float64) @ (qw * np.repeat(s, K // s.shape[0], axis=0))
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, atol=2 ** -7 * np.abs(expected).max(), rtol=0)
