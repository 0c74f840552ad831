"""Fused rotate + quantize (+ pack) kernel against an unfused float64 numpy reference.

Tie handling: the kernel rotates in float32 (two small matmuls), the reference in float64 (one dense
matmul), so y / scale differs by ~1e-6 relative. A value that sits within that distance of a .5
boundary may legitimately round to the neighbouring code. The check therefore allows a mismatch only
if (a) it is off by exactly 1, (b) the float64 value is within 1e-4 of a .5 tie, and (c) at most
0.1% of the codes (and at least 1) are affected. Any real bug (wrong rotation, scale, nibble order,
clamp) breaks (a) or (b) on most elements.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    rotate_quant,
    rotate_quant_ref,
    unpack_int4,
)
from prefixquant_jax.rotate.hadamard import hadamard_kron_factors, hadamard_matrix, random_orthogonal


def _check_codes(codes, y_over_s, qmin, qmax, *, tie: float = 1e-4, fraction: float = 0.001):
    """codes equal round(y_over_s) clamped, except off-by-one codes within `tie` of a .5 tie, at most
    `fraction` of them (and at least 1 allowed). Defaults: float32 vs float64 (module docstring)."""
    ref = np.clip(np.round(y_over_s), qmin, qmax)
    diff = codes.astype(np.int64) - ref
    bad = diff != 0
    tie_dist = np.abs(np.abs(y_over_s - np.floor(y_over_s)) - 0.5)
    assert np.all(np.abs(diff[bad]) == 1), f"codes off by more than 1: {np.unique(diff)}"
    assert np.all(tie_dist[bad] < tie), f"mismatch away from a .5 tie: {tie_dist[bad].min()}"
    assert bad.sum() <= max(1, fraction * bad.size), f"{bad.sum()} / {bad.size} codes differ"


CASES = [  # (M, K, dtype, static scale?, bits)
    (17, 64, jnp.float32, False, 4),
    (3, 576, jnp.bfloat16, False, 4),  # 576 = 36 * 16: padded tiles (64 x 16, 16 output bytes for 8)
    (3, 576, jnp.float32, True, 4),
    (3, 1536, jnp.float32, False, 4),  # 1536 = 12 * 128 -> 24 x 64 (padded to 32 x 64)
    (3, 1536, jnp.bfloat16, True, 8),
    (1, 64, jnp.float32, False, 8),
]


@pytest.mark.parametrize("M,K,dtype,static,bits", CASES)
def test_rotate_quant_hadamard(M, K, dtype, static, bits):
    rng = np.random.default_rng(K + M + bits)
    x = jnp.asarray(rng.standard_normal((M, K)) * rng.uniform(0.5, 3.0, (M, 1)), dtype)
    y = np.asarray(x, np.float64) @ hadamard_matrix(K)  # unfused float64 reference rotation
    qmin, qmax = (-8, 7) if bits == 4 else (-128, 127)
    amax = np.abs(y).max(axis=1, keepdims=True)
    scale = np.float32(0.6 * amax.max() / qmax) if static else None  # static: some values clamp
    codes, s = rotate_quant(x, hadamard_kron_factors(K), None if scale is None else np.array([[scale]]), bits=bits)
    assert codes.dtype == jnp.int8 and codes.shape == (M, K // 2 if bits == 4 else K)
    if static:
        assert s.shape == (1, 1) and float(s[0, 0]) == scale
    else:
        assert s.shape == (M, 1)
        np.testing.assert_allclose(np.asarray(s), amax / qmax, rtol=1e-5)  # float32 vs float64 amax
    q = np.asarray(unpack_int4(codes, axis=-1) if bits == 4 else codes)
    _check_codes(q, y / np.asarray(s, np.float64), qmin, qmax)
    if static:
        assert (q == qmax).any() or (q == qmin).any(), "test should exercise the clamp"


def test_rotate_quant_matches_unfused_jnp_reference():
    """Kernel vs the module's own unfused reference (einsum rotation + quantize + pack_int4)."""
    x = jnp.asarray(np.random.default_rng(5).standard_normal((5, 576)), jnp.float32)
    c, s = rotate_quant(x, hadamard_kron_factors(576))
    cr, sr = rotate_quant_ref(x, hadamard_kron_factors(576))
    np.testing.assert_allclose(np.asarray(s), np.asarray(sr), rtol=1e-6)
    y = np.asarray(x, np.float64) @ hadamard_matrix(576) / np.asarray(sr, np.float64)
    _check_codes(np.asarray(unpack_int4(c)), y, -8, 7)
    _check_codes(np.asarray(unpack_int4(cr)), y, -8, 7)


@pytest.mark.parametrize("bits", [4, 8])
def test_rotate_quant_full_grid(bits):
    """full_grid: dynamic scale amax / (qmax + 1/2 + 2^-10); each row's negative extreme gets code qmin."""
    from pallas_kernels.rotate_quant import FULL_GRID_OFFSET

    rng = np.random.default_rng(11 + bits)
    x = jnp.asarray(rng.standard_normal((6, 576)), jnp.float32)
    c, s = rotate_quant(x, hadamard_kron_factors(576), bits=bits, full_grid=True)
    cr, sr = rotate_quant_ref(x, hadamard_kron_factors(576), bits=bits, full_grid=True)
    qmin, qmax = (-8, 7) if bits == 4 else (-128, 127)
    y = np.asarray(x, np.float64) @ hadamard_matrix(576)
    amax = np.abs(y).max(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(s), amax / (qmax + 0.5 + FULL_GRID_OFFSET), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(s), np.asarray(sr), rtol=1e-6)
    q = np.asarray(unpack_int4(c)) if bits == 4 else np.asarray(c)
    _check_codes(q, y / np.asarray(s, np.float64), qmin, qmax)
    np.testing.assert_array_equal(q, np.asarray(unpack_int4(cr)) if bits == 4 else np.asarray(cr))
    neg = y.argmin(axis=1)
    assert all(q[i, neg[i]] == qmin for i in range(len(q)) if -y[i, neg[i]] == amax[i, 0])


def test_rotate_quant_kronecker_pair():
    """FlatQuant-style pair: y = x @ kron(P1, P2), i.e. Y = P1^T X P2 on each row reshaped [n1, n2]."""
    P1, P2 = random_orthogonal(12, seed=1), random_orthogonal(16, seed=2)
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_normal((3, 192)), jnp.float32)
    codes, s = rotate_quant(x, (jnp.asarray(P1, jnp.float32), jnp.asarray(P2, jnp.float32)))
    y = np.asarray(x, np.float64) @ np.kron(np.float32(P1).astype(np.float64), np.float32(P2).astype(np.float64))
    np.testing.assert_allclose(np.asarray(s), np.abs(y).max(axis=1, keepdims=True) / 7, rtol=1e-5)
    _check_codes(np.asarray(unpack_int4(codes)), y / np.asarray(s, np.float64), -8, 7)
    # P1 transposed (the other convention) must not pass: guards against a silent convention flip
    y_wrong = np.asarray(x, np.float64) @ np.kron(P1.T, P2)
    with pytest.raises(AssertionError):
        _check_codes(np.asarray(unpack_int4(codes)), y_wrong / np.asarray(s, np.float64), -8, 7)


@pytest.mark.parametrize("bits", [4, 8])
def test_rotate_quant_lac_clipping(bits):
    """Learned per-side clipping (FlatQuant's LAC): kernel vs the float64 rule, and vs the jnp reference."""
    rng = np.random.default_rng(11 + bits)
    M, K = 6, 576
    x = jnp.asarray(rng.standard_normal((M, K)) + 0.3, jnp.float32)  # asymmetric rows: min and max differ
    P1, P2 = random_orthogonal(24, 1), random_orthogonal(24, 2)
    c_min, c_max = 0.55, 0.9
    codes, s = rotate_quant(x, (P1, P2), bits=bits, lac=(c_min, c_max))
    y = np.asarray(x, np.float64) @ np.kron(P1, P2)
    qmax = 7 if bits == 4 else 127
    want = np.maximum(-np.minimum(y.min(axis=1, keepdims=True), 0) * c_min,
                      np.maximum(y.max(axis=1, keepdims=True), 0) * c_max) / qmax
    np.testing.assert_allclose(np.asarray(s), want, rtol=1e-5)
    assert not np.allclose(want, np.abs(y).max(axis=1, keepdims=True) / qmax, rtol=1e-3)  # LAC is active
    q = np.asarray(unpack_int4(codes, axis=-1) if bits == 4 else codes)
    _check_codes(q, y / np.asarray(s, np.float64), -qmax - 1, qmax)
    cr, sr = rotate_quant_ref(x, (P1, P2), bits=bits, lac=(c_min, c_max))
    np.testing.assert_allclose(np.asarray(sr), np.asarray(s), rtol=1e-6)
    with pytest.raises(ValueError, match="dynamic"):
        rotate_quant(x, (P1, P2), np.ones((1, 1)), bits=bits, lac=(c_min, c_max))
