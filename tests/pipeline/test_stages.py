"""What the stages of `quantize` (prefixquant_jax/pipeline/stages.py) leave in the model: a raw recipe's static
sites get calibrated scales, its dynamic and FP sites none, GPTQ reports its errors; the QuantizedModel's `model`
is a plain nnx module (split, jitted, differentiated w.r.t. its quantizer scales)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import prefixquant_jax as pq
from prefixquant_jax.errors import UserError
from tests.conftest import TINY_CALIB
from tests.pipeline.helpers import logits
from tests.test_api import MIXED


def test_a_mixed_recipe_calibrates_its_static_sites(tiny_quantized, tiny_ck):
    """8-bit static qkv_in, per-group dynamic down_in, per-head and per-tensor asymmetric KV, 8-bit GPTQ weights,
    no prefix."""
    qm = tiny_quantized(MIXED, gptq=True)
    assert qm.recipe is MIXED and qm.prefix_len == 0 and qm.prefix_kv is None and qm.report["prefix_ids"] == []
    assert "outliers" not in qm.report  # no prefix: no outlier scan
    blk = qm.model.layers[0]
    assert blk.recipe is MIXED
    assert {"qkv_in", "k_cache", "v_cache", "q", "down"} <= set(blk.qparams)  # the static sites and the weights
    assert not {"down_in", "o_in", "up_gate_in"} & set(blk.qparams)  # dynamic or FP: no calibrated scale
    kv = tiny_ck.config.num_kv_heads
    assert blk.qparams["k_cache"]["scale"][...].shape == (kv, 1)
    assert blk.qparams["v_cache"]["scale"][...].shape == (1, 1, 1)
    assert "zero" in blk.qparams["v_cache"] and "zero" not in blk.qparams["qkv_in"]
    assert "gptq" in qm.report and qm.report["calibration_rules"]["gptq"]
    for rep in qm.report["gptq"]:  # GPTQ's output error never above the rounding it replaces (by far, here)
        assert all(rep["gptq_err"][n] <= rep["rtn_err"][n] for n in rep["gptq_err"]), rep
    w = qm.weight(0, "q")
    assert w.bits == 8 and w.qvalue.shape == blk.attn.q.kernel[...].shape
    with pytest.raises(UserError, match="not quantized"):
        tiny_quantized("fp").weight(0, "q")


def test_an_fp_recipe_needs_no_calibration_tokens(tiny_ck):
    from prefixquant_jax.pipeline.stages import needs_calibration

    opts = pq.QuantizeOptions()
    assert not needs_calibration(pq.preset("fp"), opts) and needs_calibration(pq.preset("quarot-w4a4kv4"), opts)
    assert not needs_calibration(pq.preset("quarot-w4a4kv4"), pq.QuantizeOptions(weight_clip="mse"))
    qm = pq.quantize(tiny_ck, None, "fp")
    assert qm.prefix_len == 0 and qm.recipe.is_fp and "calibration" not in qm.report
    with pytest.raises(UserError, match="needs calibration tokens"):
        pq.quantize(tiny_ck, None, "w4a4kv4-static")


def test_the_quantized_model_is_a_pure_differentiable_module(tiny_quantized):
    """qm.model(tokens) behind its prefix; nnx.split + jax.jit of nnx.merge(graphdef, state)(tokens) is a pure
    function of the state, differentiable w.r.t. a filtered part of it (the Scale variables: what training moves)."""
    qm = tiny_quantized("w4a4kv4-static")
    toks = jnp.asarray(TINY_CALIB[:2, :8])
    eager = np.asarray(qm.model(toks))
    jitted = logits(qm.model, toks)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)  # eager rounds a few ops differently

    graphdef, scales, rest = nnx.split(qm.model, pq.Scale, ...)
    assert {type(v) for v in jax.tree.leaves(scales, is_leaf=lambda x: isinstance(x, nnx.Variable))} == {pq.Scale}

    @jax.jit
    def loss(scales, rest, toks):
        out = nnx.merge(graphdef, scales, rest)(toks)
        return -jnp.mean(jax.nn.log_softmax(out[:, :-1]) * jax.nn.one_hot(toks[:, 1:], out.shape[-1])) * out.shape[-1]

    value, grads = jax.value_and_grad(loss)(scales, rest, toks)
    g = jax.tree.leaves(grads)
    assert np.isfinite(float(value)) and all(np.all(np.isfinite(np.asarray(a))) for a in g)
    assert sum(float(jnp.abs(a).sum()) for a in g) > 0  # straight-through rounding: the scales get gradients
    again = loss(scales, rest, toks)  # pure: the same state, the same value; the model itself is untouched
    assert float(again) == float(value)
    np.testing.assert_array_equal(logits(qm.model, toks), jitted)
    moved = jax.tree.map(lambda s, d: s * (1 + 0.01 * jnp.sign(d)), scales, grads)
    assert float(loss(moved, rest, toks)) != float(value)
