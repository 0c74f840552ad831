"""The compiled kernels on a GPU against numpy references (marked gpu: `pytest -m gpu`, skipped on the CPU).

The CPU suite runs the same kernels in interpret mode; here they run as Triton kernels, at the GPU
benchmark shapes and at odd ones. Tolerances differ from the CPU tests where the GPU computes
differently:
  * int32 accumulators: bit-exact, as on the CPU (int8 MMA with int32 accumulation is exact).
  * f32 dots inside kernels run in TF32 (Triton's default for f32 inputs: 10-bit mantissa, relative
    2^-11 per input). rotate_quant's codes therefore may differ by one from the float64 reference where
    the rotated value lies within ~1e-2 of a rounding tie (error ~2^-11 x rms(y) / scale, a few 1e-3 of
    a code): allowed for at most 2 % of the codes. decode_attention with f32 q: scores and outputs
    within 2e-2 absolute / 1e-2 relative of float64 (O(1) outputs).
  * bf16 outputs: 2^-8 relative, as on the CPU.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    decode_attention,
    gemv_w4,
    pack_int4,
    rotate_quant,
    unpack_int4,
    w4a4_matmul,
    w4a8_matmul,
)
from prefixquant_jax.rotate.hadamard import hadamard_kron_factors
from tests.pallas_kernels.test_decode_attention import np_attention, random_decode_inputs
from tests.pallas_kernels.test_rotate_quant import _check_codes

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (JAX backend is not gpu)")]

def exact_int_matmul(a, b):
    """a @ b for small integer matrices through float64 BLAS (numpy's integer matmul has no BLAS and takes
    minutes at 2048 x 4096 x 4096): exact while |a @ b| < 2^53 (here < 2^23)."""
    return (a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)


def rotate_f64(x, K):
    """x @ H_K in float64 through the Kronecker factors (dense H at K = 14336 would be 1.6 GB)."""
    P1, P2 = hadamard_kron_factors(K)
    return np.einsum("mij,ia,jb->mab", x.reshape(len(x), P1.shape[0], P2.shape[0]), P1, P2).reshape(x.shape)


GEMM_SHAPES = [(2048, 4096, 4096), (16, 4096, 14336), (37, 576, 960), (5, 1536, 576), (300, 14336, 512)]


@pytest.mark.parametrize("M,K,N", GEMM_SHAPES)
def test_w4a4_w4a8_exact_on_gpu(M, K, N):
    rng = np.random.default_rng(M + K + N)
    qx4, qx8, qw = rng.integers(-8, 8, (M, K)), rng.integers(-128, 128, (M, K)), rng.integers(-8, 8, (K, N))
    wp = pack_int4(qw, axis=0)
    xs = rng.uniform(0.01, 0.1, (M, 1)).astype(np.float32)
    ws = rng.uniform(0.01, 0.1, (1, N)).astype(np.float32)
    for kind, qx, fn, xq in (("w4a4", qx4, w4a4_matmul, pack_int4(qx4, axis=-1)),
                             ("w4a8", qx8, w4a8_matmul, jnp.asarray(qx8, jnp.int8))):
        expected = exact_int_matmul(qx, qw)
        acc = fn(xq, xs, wp, ws, return_int32=True)
        np.testing.assert_array_equal(np.asarray(acc), expected, err_msg=kind)
        y = fn(xq, xs, wp, ws)  # bf16 epilogue
        np.testing.assert_allclose(np.asarray(y, np.float32), (expected.astype(np.float32) * xs) * ws,
                                   rtol=2 ** -8, atol=1e-30, err_msg=kind)


@pytest.mark.parametrize("M", [1, 8, 16, 3])
@pytest.mark.parametrize("K,N,group", [(4096, 4096, None), (4096, 14336, 128), (576, 960, 64)])
def test_gemv_on_gpu(M, K, N, group):
    rng = np.random.default_rng(M * K)
    qw = rng.integers(-8, 8, (K, N))
    s = rng.uniform(0.01, 0.1, (1 if group is None else K // group, N)).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    y = gemv_w4(x, pack_int4(qw, axis=0), s)
    w = qw * np.repeat(s, K // s.shape[0], axis=0)
    expected = np.asarray(x, np.float64) @ w
    # bf16 x and exact bf16 codes, f32 accumulation: the error is the bf16 rounding of the output
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, atol=2 ** -7 * scale, rtol=0)


@pytest.mark.parametrize("M,K", [(2048, 4096), (64, 14336), (37, 576), (7, 1536)])
@pytest.mark.parametrize("static", [False, True])
def test_rotate_quant_on_gpu(M, K, static):
    rng = np.random.default_rng(M + K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[:, rng.integers(0, K, 3)] *= 20.0  # channel outliers, as rotation sees them
    xb = jnp.asarray(x, jnp.bfloat16)  # the runtime's activations; the reference rotates the same values
    y = rotate_f64(np.asarray(xb, np.float64), K)
    scale = np.float32(np.abs(y).max() / 7.0) if static else None
    codes, s = rotate_quant(xb, hadamard_kron_factors(K), scale)
    s = np.asarray(s, np.float64)
    if not static:
        np.testing.assert_allclose(s[:, 0], np.abs(y).max(axis=1) / 7.0, rtol=2e-3)
    # TF32 (module docstring): off-by-one codes within 1e-2 of a tie, at most 2 % of them
    _check_codes(np.asarray(unpack_int4(codes, axis=-1)), y / s, -8, 7, tie=1e-2, fraction=0.02)


@pytest.mark.parametrize("B,H,KV,hd,T,P,dtype", [(1, 32, 8, 128, 2048, 4, jnp.bfloat16),
                                                 (4, 32, 8, 128, 2048, 0, jnp.bfloat16),
                                                 (2, 9, 3, 64, 300, 8, jnp.float32),
                                                 (3, 9, 3, 64, 17, 1, jnp.bfloat16)])
def test_decode_attention_on_gpu(B, H, KV, hd, T, P, dtype):
    rng = np.random.default_rng(B * T + P)
    lengths = rng.integers(1, T + 1, B).tolist()
    q, kc, vc, ks, kz, vs, vz, pk, pv = random_decode_inputs(rng, B, H, KV, hd, T, P, dtype)
    out = decode_attention(q, kc, vc, jnp.asarray(lengths, jnp.int32), ks, kz, vs, vz, pk, pv)
    expected = np_attention(q, kc, vc, lengths, ks, kz, vs, vz, pk, pv)
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=3e-2, rtol=2e-2)
