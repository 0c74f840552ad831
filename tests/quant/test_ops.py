"""Each quantizer against a plain numpy reference (exact for fp32 inputs; bf16 within one step)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefixquant_jax.errors import UserError
from prefixquant_jax.quant.ops import fake_quant, mse_clip_search, ste_round
from prefixquant_jax.quant.spec import QuantSpec


def np_fake_quant(x, bits, sym, axes, clip=1.0, group=None):
    x = x.astype(np.float64)
    shape = x.shape
    if group:
        x = x.reshape(*shape[:-1], shape[-1] // group, group)
    lo, hi = x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True)
    if sym:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = np.maximum(np.maximum(np.abs(lo), np.abs(hi)) * clip / qmax, 1e-8)
        zero = 0.0
    else:
        qmin, qmax = 0, 2 ** bits - 1
        lo, hi = np.minimum(lo, 0) * clip, np.maximum(hi, 0) * clip
        scale = np.maximum((hi - lo) / qmax, 1e-8)
        zero = np.round(-lo / scale)
    q = np.clip(np.round(x / scale) + zero, qmin, qmax)
    return ((q - zero) * scale).reshape(shape)


X = np.random.default_rng(0).standard_normal((2, 6, 4, 8)).astype(np.float32) * np.array([1, 5, 0.3, 2] * 2, np.float32)
CASES = [("tensor", (0, 1, 2, 3), None), ("channel", (0, 1, 2), None), ("token", (3,), None),
         ("head", (0, 1, 3), None), ("group", (4,), 4)]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gran,axes,group", CASES)
def test_dynamic_matches_numpy(bits, sym, gran, axes, group):
    spec = QuantSpec(bits=bits, granularity=gran, symmetric=sym, dynamic=True, group_size=group, clip_ratio=0.9)
    got = np.asarray(jax.jit(lambda x: fake_quant(x, spec))(jnp.asarray(X)))
    want = np_fake_quant(X, bits, sym, axes, 0.9, group)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # at most 2^bits distinct levels per quantization group (checked per tensor here)
    if gran == "tensor":
        assert len(np.unique(got)) <= 2 ** bits


def test_static_per_tensor_and_per_head():
    spec = QuantSpec(bits=4, granularity="tensor", symmetric=True)
    scale = jnp.full((1, 1, 1, 1), 0.25)
    got = np.asarray(fake_quant(jnp.asarray(X), spec, scale=scale))
    np.testing.assert_allclose(got, np.clip(np.round(X / 0.25), -8, 7) * 0.25, atol=1e-6)
    spec_h = QuantSpec(bits=4, granularity="head", symmetric=False)
    s, z = jnp.asarray([[0.1], [0.2], [0.3], [0.4]]), jnp.asarray([[8.0], [7.0], [6.0], [5.0]])
    got = np.asarray(fake_quant(jnp.asarray(X), spec_h, scale=s, zero=z))
    want = (np.clip(np.round(X / np.asarray(s)) + np.asarray(z), 0, 15) - np.asarray(z)) * np.asarray(s)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_bf16_input_keeps_dtype_and_is_close():
    spec = QuantSpec(bits=8, granularity="token", dynamic=True)
    xb = jnp.asarray(X, jnp.bfloat16)
    got = fake_quant(xb, spec)
    assert got.dtype == jnp.bfloat16
    want = np_fake_quant(np.asarray(xb, np.float32), 8, True, (3,))
    step = np.abs(np.asarray(xb, np.float32)).max(axis=-1, keepdims=True) / 127
    assert np.all(np.abs(np.asarray(got, np.float32) - want) <= step + 1e-2 * np.abs(want))


def test_straight_through_gradients():
    g = jax.grad(lambda x: ste_round(x).sum())(jnp.asarray([0.2, 1.7]))
    np.testing.assert_array_equal(np.asarray(g), [1.0, 1.0])
    spec = QuantSpec(bits=4, granularity="tensor")
    # inside the range the gradient w.r.t. x is 1 and w.r.t. the static scale is nonzero (trainable)
    gx, gs = jax.grad(lambda x, s: fake_quant(x, spec, scale=s).sum(), argnums=(0, 1))(jnp.asarray([0.3, -0.6]), jnp.asarray(0.1))
    np.testing.assert_allclose(np.asarray(gx), [1.0, 1.0])
    assert float(gs) != 0.0


def test_mse_clip_search_never_worse_than_no_clip():
    w = np.random.default_rng(1).standard_t(3, size=(64, 16)).astype(np.float32)
    spec = QuantSpec(bits=4, granularity="channel")
    ratios = np.linspace(1.0, 0.5, 11)
    clip = np.asarray(mse_clip_search(jnp.asarray(w), spec, ratios))
    assert clip.shape == (1, 16)
    e_clip = ((np_fake_quant(w, 4, True, (0,), 1.0) - w) ** 2).sum(0)
    best = np.min([((np_fake_quant(w, 4, True, (0,), r) - w) ** 2).sum(0) for r in ratios], axis=0)
    got = ((np.asarray(fake_quant(jnp.asarray(w), spec.replace(dynamic=True), clip=jnp.asarray(clip))) - w) ** 2).sum(0)
    np.testing.assert_allclose(got, best, rtol=1e-4)
    assert np.all(got <= e_clip + 1e-6)


def test_bad_specs():
    with pytest.raises(UserError):
        QuantSpec(bits=1)
    with pytest.raises(UserError):
        QuantSpec(bits=4, granularity="row")
    with pytest.raises(UserError):
        QuantSpec(bits=4, granularity="group")
