"""QArray (quant/qarray.py), the one encoder: codes and dequantization against a numpy reference, int4
packing, concatenation without re-quantization, the straight-through fake quantizer, and agreement with
the runtime's packed weights and the checkpoint codes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefixquant_jax.quant.qarray import EPS, QArray, concatenate, dequantize, fake_quant, quantize
from prefixquant_jax.quant.spec import QuantSpec


def np_codes(x, spec, scale, zero=0.0):
    """Reference: clip(round_half_even(x / max(scale, EPS)) + zero) in float64, per the spec's range."""
    s = np.maximum(np.asarray(scale, np.float64), EPS)
    return np.clip(np.round(np.asarray(x, np.float64) / s) + zero, spec.qmin, spec.qmax)


@pytest.mark.parametrize("bits", [4, 8])
def test_static_channel_codes_and_dequantize(bits):
    spec = QuantSpec(bits=bits, granularity="channel", full_grid=True)
    x = np.random.default_rng(bits).standard_normal((32, 6)).astype(np.float32)
    scale = (np.abs(x).max(0, keepdims=True) / spec.sym_divisor * 0.8).astype(np.float32)  # some clamp
    q = quantize(jnp.asarray(x), spec, scale=jnp.asarray(scale))
    assert q.qvalue.dtype == jnp.int8 and q.zero_point is None and q.shape == (32, 6)
    ref = np_codes(x, spec, scale)
    np.testing.assert_array_equal(np.asarray(q.qvalue), ref)  # |x / s| is far from ties at this size
    assert (ref == spec.qmax).any() or (ref == spec.qmin).any()
    np.testing.assert_allclose(np.asarray(dequantize(q)), ref * scale, rtol=1e-6)


def test_dynamic_asymmetric_head_codes_are_uint8():
    spec = QuantSpec(bits=8, granularity="head", symmetric=False, dynamic=True)
    x = np.random.default_rng(1).standard_normal((2, 5, 3, 8)).astype(np.float32) + 0.7
    q = quantize(jnp.asarray(x), spec)
    assert q.qvalue.dtype == jnp.uint8 and q.zero_point is not None
    lo = np.minimum(x.min(axis=(0, 1, 3), keepdims=True), 0.0)
    hi = np.maximum(x.max(axis=(0, 1, 3), keepdims=True), 0.0)
    s = np.maximum((hi - lo) / 255.0, EPS)
    z = np.round(-lo / s)
    np.testing.assert_allclose(np.asarray(q.scale), s, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q.zero_point), z)
    assert np.mean(np.asarray(q.qvalue) != np_codes(x, spec, s, z)) < 1e-3  # float32 vs float64 at ties
    np.testing.assert_allclose(np.asarray(q.dequantize()), x, atol=float(s.max()))


def test_group_granularity():
    spec = QuantSpec(bits=4, granularity="group", group_size=4, dynamic=True)
    x = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    q = quantize(jnp.asarray(x), spec)
    assert q.shape == (3, 8) and q.scale.shape == (3, 2, 1)
    g = x.reshape(3, 2, 4)
    s = np.abs(g).max(-1, keepdims=True) / 7
    np.testing.assert_allclose(np.asarray(q.dequantize()), (np_codes(g, spec, s) * s).reshape(3, 8), rtol=1e-6)


def test_pack_unpack_and_concatenate_keep_codes():
    spec = QuantSpec(bits=4, granularity="channel", full_grid=True)
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal((16, n)).astype(np.float32) for n in (5, 3))
    qa, qb = (quantize(jnp.asarray(w), spec, scale=jnp.abs(jnp.asarray(w)).max(0, keepdims=True) / 7.5) for w in (a, b))
    pa, pb = qa.pack(axis=0), qb.pack(axis=0)
    assert pa.qvalue.shape == (8, 5) and pa.packed_axis == 0 and pa.shape == (16, 5)
    np.testing.assert_array_equal(np.asarray(pa.codes), np.asarray(qa.qvalue))
    cat = concatenate([pa, pb], axis=1)
    np.testing.assert_array_equal(np.asarray(cat.codes), np.concatenate([qa.qvalue, qb.qvalue], axis=1))
    np.testing.assert_array_equal(np.asarray(cat.dequantize()),
                                  np.concatenate([qa.dequantize(), qb.dequantize()], axis=1))
    with pytest.raises(ValueError, match="differ"):
        concatenate([pa, qb], axis=1)  # packed with unpacked
    with pytest.raises(ValueError, match="zero point"):
        quantize(jnp.asarray(a), QuantSpec(bits=4, symmetric=False, dynamic=True)).pack()


def test_fake_quant_is_dequantize_of_quantize_with_straight_through_gradient():
    spec = QuantSpec(bits=4, granularity="tensor")
    x = jnp.asarray(np.random.default_rng(4).standard_normal((4, 8)), jnp.float32)
    scale = jnp.asarray(0.3, jnp.float32)
    np.testing.assert_array_equal(np.asarray(fake_quant(x, spec, scale)),
                                  np.asarray(dequantize(quantize(x, spec, scale=scale))))
    gx = jax.grad(lambda x: fake_quant(x, spec, scale).sum())(x)
    inside = np.abs(np.asarray(x) / 0.3) < 7.5  # not clamped: identity gradient
    np.testing.assert_array_equal(np.asarray(gx), inside.astype(np.float32))
    gs = jax.grad(lambda s: fake_quant(x, spec, s).sum())(scale)
    q = np.clip(np.round(np.asarray(x) / 0.3), -8, 7)
    ref = np.sum(np.where(inside, q - np.asarray(x) / 0.3, q))  # LSQ: d/ds (round(x/s) s) with STE
    np.testing.assert_allclose(float(gs), ref, rtol=1e-5)


def test_is_a_pytree_with_static_metadata():
    q = quantize(jnp.ones((4, 2)), QuantSpec(bits=4, granularity="channel", dynamic=True)).pack(axis=0)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 2  # qvalue, scale (zero_point None)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(back, QArray) and back.bits == 4 and back.packed_axis == 0
    out = jax.jit(lambda q: q.dequantize())(q)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(q.dequantize()))
