"""The data-aware clip rules (quant/clip_search.py) and the full grid, each against a small numpy reference
that computes the rule's own definition directly (float64, from the data, not from a Gram matrix)."""
import jax.numpy as jnp
import numpy as np
import pytest

from prefixquant_jax.quant.clip_search import (attention_probs, head_clip_attention, head_clip_reconstruction,
                                               output_aware_weight_clip)
from prefixquant_jax.quant.ops import fake_quant
from prefixquant_jax.quant.spec import FULL_GRID_OFFSET, QuantSpec

RATIOS = tuple(np.round(np.linspace(1.0, 0.5, 11), 3))


def np_sym(w, amax, bits, full_grid):
    qmax = 2 ** (bits - 1) - 1
    s = np.maximum(amax / (qmax + 0.5 + FULL_GRID_OFFSET if full_grid else qmax), 1e-8)
    return np.clip(np.round(w / s), -qmax - 1, qmax) * s


def np_asym_head(x, lo, hi, r, bits=4):
    """x [N, L, KV, hd]; lo, hi, r [KV]."""
    lo, hi = np.minimum(lo, 0) * r, np.maximum(hi, 0) * r
    s = np.maximum((hi - lo) / (2 ** bits - 1), 1e-8)
    z = np.round(-lo / s)
    s, z = s[:, None], z[:, None]
    return (np.clip(np.round(x / s) + z, 0, 2 ** bits - 1) - z) * s


@pytest.mark.parametrize("full_grid", [False, True])
def test_full_grid_matches_numpy(full_grid):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 24)).astype(np.float32)
    w[3, :] = -np.abs(w).max(axis=0) * 1.0  # the negative extreme of every column: full_grid maps it to -8
    spec = QuantSpec(bits=4, granularity="channel", symmetric=True, dynamic=True, full_grid=full_grid)
    got = np.asarray(fake_quant(jnp.asarray(w), spec))
    want = np_sym(w.astype(np.float64), np.abs(w).max(axis=0, keepdims=True), 4, full_grid)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    levels = np.round(got / np.abs(got).max(axis=0, keepdims=True) * (7.5 if full_grid else 8) * (1 - 1e-9))
    assert levels.min() == -8 and levels.max() == 7 if full_grid else levels.min() >= -8
    if full_grid:  # step 2 amax / 15 (6.7 % finer than amax / 7), extremes at -8 and 7 steps
        step = np.abs(w).max(axis=0) / (7.5 + FULL_GRID_OFFSET)
        np.testing.assert_allclose(got[3], -8 * step, rtol=1e-6)


def test_output_aware_weight_clip_matches_direct_search():
    rng = np.random.default_rng(1)
    T, n_in, n_out = 300, 32, 12
    x = rng.standard_normal((T, n_in)) * np.where(np.arange(n_in) < 3, 8.0, 1.0)  # a few loud input channels
    w = rng.standard_normal((n_in, n_out)) * rng.uniform(0.2, 2.0, n_out)
    w[0, :4] *= 6.0  # outlier weights on a loud channel: clipping them costs more than the data-free rule thinks
    spec = QuantSpec(bits=4, granularity="channel", symmetric=True, full_grid=True)
    ratio, errs = output_aware_weight_clip(jnp.asarray(w, jnp.float32), jnp.asarray(x.T @ x, jnp.float32), spec, RATIOS)
    amax = np.abs(w).max(axis=0, keepdims=True)
    direct = np.stack([((x @ w - x @ np_sym(w, amax * r, 4, True)) ** 2).sum(axis=0) for r in RATIOS])  # [R, out]
    np.testing.assert_allclose(np.asarray(errs), direct, rtol=2e-3)
    np.testing.assert_allclose(np.asarray(ratio)[0], np.asarray(RATIOS)[direct.argmin(axis=0)], rtol=1e-6)
    # it is not the data-free choice everywhere (the test would not tell the rules apart otherwise)
    data_free = np.stack([((w - np_sym(w, amax * r, 4, True)) ** 2).sum(axis=0) for r in RATIOS]).argmin(axis=0)
    assert (data_free != direct.argmin(axis=0)).any()


def test_head_clip_reconstruction_matches_numpy():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 20, 3, 8)) * np.array([1.0, 3.0, 0.5])[:, None]
    x[0, 5, 1, 2] = 25.0  # one outlier in head 1 makes clipping pay off there
    spec = QuantSpec(bits=4, granularity="head", symmetric=False)
    lo, hi = x.min(axis=(0, 1, 3)), x.max(axis=(0, 1, 3))
    ratio, errs = head_clip_reconstruction(jnp.asarray(x, jnp.float32), spec, RATIOS)
    want = np.stack([((x - np_asym_head(x, lo, hi, np.full(3, r))) ** 2).mean(axis=(0, 1, 3)) for r in RATIOS])
    np.testing.assert_allclose(np.asarray(errs), want, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(ratio)[:, 0], np.asarray(RATIOS)[want.argmin(axis=0)], rtol=1e-6)
    assert np.asarray(ratio)[1, 0] < 1.0


def np_probs(q, k, pk):
    N, L, H, hd = q.shape
    KV = k.shape[2]
    keys = np.concatenate([np.broadcast_to(pk[None], (N,) + pk.shape), k], axis=1)
    P = pk.shape[0]
    out = np.zeros((N, H, L, P + L))
    for h in range(H):
        s = np.einsum("nld,ntd->nlt", q[:, :, h], keys[:, :, h // (H // KV)]) / np.sqrt(hd)
        s = np.where(np.arange(P + L)[None, None, :] <= (P + np.arange(L))[None, :, None], s, -np.inf)
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        out[:, h] = e / e.sum(axis=-1, keepdims=True)
    return out


def test_head_clip_attention_matches_numpy():
    rng = np.random.default_rng(3)
    N, L, H, KV, hd, P = 2, 12, 4, 2, 8, 2
    q = rng.standard_normal((N, L, H, hd)) * 2.0
    k = rng.standard_normal((N, L, KV, hd))
    k[..., 0] *= 6.0  # a loud key channel (as RoPE'd keys have)
    pk = rng.standard_normal((P, KV, hd)) * 3.0
    np.testing.assert_allclose(np.asarray(attention_probs(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                                          jnp.asarray(pk, jnp.float32))), np_probs(q, k, pk), atol=1e-6)
    spec = QuantSpec(bits=4, granularity="head", symmetric=False)
    lo, hi = k.min(axis=(0, 1, 3)), k.max(axis=(0, 1, 3))
    ratio, errs = head_clip_attention(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), spec, RATIOS,
                                      jnp.asarray(pk, jnp.float32))
    ref = np_probs(q, k, pk)
    want = []
    for r in RATIOS:
        d = (np_probs(q, np_asym_head(k, lo, hi, np.full(KV, r)), pk) - ref) ** 2  # [N, H, L, T]
        want.append(d.reshape(N, KV, H // KV, L, P + L).mean(axis=(0, 2, 3, 4)))
    want = np.stack(want)
    np.testing.assert_allclose(np.asarray(errs), want, rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(np.asarray(ratio)[:, 0], np.asarray(RATIOS)[want.argmin(axis=0)], rtol=1e-6)
