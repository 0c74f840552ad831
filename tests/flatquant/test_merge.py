"""FlatQuant on a tiny Llama: with quantization off the transformed model (trained or merged) is the FP
model; with quantization on the merged model matches the unmerged one (same weight codes up to ties).
`FlatQuantRecipe.prefix` (was kv_original_space) chooses the KV layout: cached in the transformed space (False)
or mapped back to the original one (True, as behind an FP prefix)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from prefixquant_jax.flatquant.merge import merge_model
from prefixquant_jax.flatquant.recipe import FlatQuantRecipe, channel_scale, quantizable_kernel
from prefixquant_jax.flatquant.transforms import ClipLogit, FactorBase, SingularValues, SmoothScale, init_block
from prefixquant_jax.nn.decoder import WEIGHT_NAMES, Decoder
from prefixquant_jax.quant.spec import QuantSpec

A4 = QuantSpec(bits=4, granularity="token", symmetric=True, dynamic=True)
KV4 = QuantSpec(bits=4, granularity="token", symmetric=False, dynamic=True)
W4 = QuantSpec(bits=4, granularity="channel", symmetric=True)
QSITES = tuple((s, A4) for s in ("qkv_in", "o_in", "up_gate_in", "down_in")) + (("k_cache", KV4), ("v_cache", KV4))


@pytest.fixture(scope="module")
def ck(tiny_ck):
    return tiny_ck


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(3, 300, size=(2, 24)), jnp.int32)


def _variables(t):
    """Every variable of a block's transforms (nested nnx.Dicts), in a fixed order."""
    for key in t:
        v = t[key]
        if isinstance(v, nnx.Variable):
            yield v
        else:
            yield from _variables(v)


def flat_model(ck, recipe, seed=0):
    """A model whose transforms look trained: non-orthogonal factors, uneven scales, active clipping."""
    c = ck.config
    q = Decoder(c, ck.params, recipe=recipe)
    rng = np.random.default_rng(seed)
    stats = {"qkv_in": rng.uniform(0.5, 3, c.hidden_size), "up_gate_in": rng.uniform(0.5, 3, c.hidden_size),
             "down_in": rng.uniform(0.5, 3, c.intermediate_size)}
    lac = [s for s, spec in recipe.sites if spec.dynamic]
    for i, b in enumerate(q.layers):
        init_block(b, c, (seed, i), recipe.param, stats, lwc=recipe.weight is not None, lac_sites=lac)
        for var in _variables(b.transforms):
            a = np.asarray(var[...])
            if isinstance(var, ClipLogit):
                new = rng.uniform(0.5, 4.0, a.shape)
            elif isinstance(var, (FactorBase, SmoothScale)):
                continue
            elif isinstance(var, SingularValues):
                new = a * rng.uniform(0.7, 1.4, a.shape)
            else:  # a Factor (or an orthogonal factor's Cayley generator)
                new = a + 0.15 * rng.standard_normal(a.shape)
            var[...] = jnp.asarray(new, jnp.float32)
    return q


@pytest.fixture(scope="module")
def fp_logits(ck, tokens):
    return np.asarray(Decoder(ck.config, ck.params)(tokens))


@pytest.mark.parametrize("param,kv_orig", [("inverse", False), ("orthogonal", True)])
def test_quant_off_equals_fp_and_merged(ck, tokens, fp_logits, param, kv_orig):
    ref = fp_logits
    q = flat_model(ck, FlatQuantRecipe(param=param, prefix=kv_orig))
    out = np.asarray(q(tokens))
    q, _ = merge_model(q)
    assert q.layers[0].recipe.merged and "smooth" not in q.layers[0].transforms["qkv_in"]
    merged = np.asarray(q(tokens))
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_allclose(merged, out, atol=1e-5)


def _codes(q):
    """Integer weight codes per (layer, linear) as the forward uses them."""
    out = {}
    for i, b in enumerate(q.layers):
        for name in WEIGHT_NAMES:
            mod = b.linear_module(name)
            if b.recipe.merged:
                k, s = mod.kernel[...], b.qparams[name]["scale"][...]
            else:
                k = quantizable_kernel(b.transforms, name, mod.kernel[...], b.recipe.param)
                s = channel_scale(k, W4)
            out[i, name] = np.clip(np.round(np.asarray(k) / np.asarray(s)), -8, 7)
    return out


@pytest.mark.parametrize("kv_orig", [False, True])
def test_merged_equals_unmerged_quantized(ck, tokens, fp_logits, kv_orig):
    q = flat_model(ck, FlatQuantRecipe(sites=QSITES, weight=W4, prefix=kv_orig), seed=1)
    fp = fp_logits
    before, codes0 = np.asarray(q(tokens)), _codes(q)
    q, _ = merge_model(q)
    after, codes1 = np.asarray(q(tokens)), _codes(q)
    for key in codes0:
        assert (codes0[key] == codes1[key]).mean() >= 0.999, key
    quant_err = np.abs(before - fp).mean()
    assert quant_err > 1e-4  # quantization is really on
    assert np.abs(after - before).mean() < 0.02 * quant_err, (np.abs(after - before).mean(), quant_err)
    assert np.abs(after - before).max() < 0.2 * np.abs(before - fp).max()


def test_kv_layouts_agree(ck, tokens, fp_logits):
    """Cached codes of k P_k / v P_v with q P_k^-T (FlatQuant, recipe.prefix False) == dequantized back to the
    original space (recipe.prefix True: the layout behind an FP prefix)."""
    outs = [np.asarray(flat_model(ck, FlatQuantRecipe(sites=QSITES, weight=W4, prefix=o), seed=2)(tokens))
            for o in (False, True)]
    fp = fp_logits
    assert np.abs(outs[0] - outs[1]).mean() < 0.02 * np.abs(outs[0] - fp).mean()



@pytest.mark.parametrize("param", ["inverse", "orthogonal"])
def test_grouped_products_equal_one_linear_at_a_time(ck, tokens, param, monkeypatch):
    """Before the merge q|k|v and gate|up run as one product (FlatQuantRecipe.products): the same logits and the same
    gradients of the transforms as one linear at a time (the reference), to float32 reassociation. A weight code
    that flips on a rounding boundary moves a logit by a quantization step, so the bound is on the mean."""
    from prefixquant_jax.flatquant.transforms import TransformParam

    q = flat_model(ck, FlatQuantRecipe(sites=QSITES, weight=W4, param=param), seed=2)

    def loss_and_grads():
        def loss(m):
            return jnp.mean(jax.nn.log_softmax(m(tokens)).max(axis=-1))
        value, g = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, TransformParam))(q)
        return float(value), [np.asarray(v[...]) for v in jax.tree.leaves(g, is_leaf=lambda x: isinstance(x, nnx.Variable))]

    logits = np.asarray(q(tokens))
    value, grads = loss_and_grads()
    monkeypatch.setattr(FlatQuantRecipe, "products", lambda self, names, x, block: None)
    ref_logits = np.asarray(q(tokens))
    ref_value, ref_grads = loss_and_grads()
    assert np.abs(logits - ref_logits).mean() < 1e-4 * np.abs(ref_logits).mean()
    assert abs(value - ref_value) < 1e-4 * abs(ref_value)
    assert len(grads) == len(ref_grads) > 0
    for g, r in zip(grads, ref_grads):
        assert np.abs(g - r).mean() <= 1e-3 * np.abs(r).mean() + 1e-9, (np.abs(g - r).mean(), np.abs(r).mean())
