"""`pq.quantize` with a raw QuantRecipe: a preset's own recipe given raw quantizes bit for bit as the preset does;
a researcher's mixed recipe (8-bit static, per-group dynamic, per-tensor KV, GPTQ, no prefix) runs through the same
pipeline, saves, reloads and resumes its training run; what a bare recipe cannot be raises a one-line UserError."""
import jax
import numpy as np
import pytest

import prefixquant_jax as pq
from prefixquant_jax.errors import UserError
from prefixquant_jax.quant.recipe import Capture, QuantRecipe
from prefixquant_jax.quant.spec import QuantSpec

OPTS = dict(eta=4, outlier_samples=4)
MIXED = QuantRecipe(sites=(("qkv_in", QuantSpec(bits=8, granularity="tensor")),
                           ("down_in", QuantSpec(bits=4, granularity="group", group_size=16, dynamic=True)),
                           ("k_cache", QuantSpec(bits=4, granularity="head", symmetric=False)),
                           ("v_cache", QuantSpec(bits=4, granularity="tensor", symmetric=False))),
                    weight=QuantSpec(bits=8, granularity="channel", full_grid=True), r3=True, r4=True)


@pytest.fixture(scope="module")
def data(tiny_dir, text_file):
    """(checkpoint, calibration tokens [4, 32], eval windows [2, 32])."""
    from prefixquant_jax.eval.data import calibration_samples, load_text, tokenize, windows

    ck = pq.load_checkpoint(tiny_dir)
    ids = tokenize(ck.tokenizer(), load_text(text_file))
    return ck, calibration_samples(ids, 4, 32, 0), windows(ids, 32, 2)


def _logits(qm, tokens):
    return np.asarray(jax.jit(qm.apply)(qm.split()[1], tokens))


def test_a_presets_recipe_given_raw_quantizes_as_the_preset(data):
    ck, calib, win = data
    preset = pq.get_preset("w4a4kv4-static")
    qp = pq.quantize(ck, calib, preset.name, **OPTS)
    qr = pq.quantize(ck, calib, preset.recipe(), **OPTS)
    assert qr.preset.name == "custom" and qr.preset.recipe() == preset.recipe() and qr.preset.is_static
    assert (qr.preset.rotate, qr.preset.prefix, qr.preset.w_bits, qr.preset.a_bits, qr.preset.kv_bits) == (True, True, 4, 4, 4)
    assert qr.report["prefix_ids"] == qp.report["prefix_ids"] and qr.prefix_len == qp.prefix_len > 0
    np.testing.assert_array_equal(_logits(qr, win), _logits(qp, win))
    assert pq.perplexity(qr, win)["ppl"] == pq.perplexity(qp, win)["ppl"]


def test_a_mixed_recipe_quantizes_saves_and_reloads(data, tmp_path):
    ck, calib, win = data
    qm = pq.quantize(ck, calib, MIXED, prefix=False, gptq=True, **OPTS)
    assert qm.prefix_len == 0 and qm.prefix_kv is None and qm.preset.recipe() is MIXED
    assert (qm.preset.w_bits, qm.preset.a_bits, qm.preset.kv_bits, qm.preset.act_dynamic) == (8, 4, 4, False)  # lowest bits
    blk = qm.model.layers[0]
    assert blk.recipe is MIXED
    assert {"qkv_in", "k_cache", "v_cache", "q", "down"} <= set(blk.qparams)  # the static sites and the weights
    assert not {"down_in", "o_in", "up_gate_in"} & set(blk.qparams)  # dynamic or FP: no calibrated scale
    assert blk.qparams["k_cache"]["scale"][...].shape == (2, 1) and blk.qparams["v_cache"]["scale"][...].shape == (1, 1, 1)
    assert "zero" in blk.qparams["v_cache"] and "gptq" in qm.report
    assert qm.weight(0, "q").bits == 8
    ppl = pq.perplexity(qm, win)["ppl"]
    assert np.isfinite(ppl)

    again = pq.load(pq.save(qm, str(tmp_path / "mixed")))
    assert again.preset == qm.preset and again.preset.recipe() == MIXED
    np.testing.assert_array_equal(_logits(again, win), _logits(qm, win))
    assert pq.perplexity(again, win)["ppl"] == ppl


def test_a_recipes_training_run_resumes(data, tmp_path):
    """The training fingerprint holds the recipe; a resume of the same run matches it (JSON lists vs tuples)."""
    ck, calib, win = data
    train = pq.TrainConfig(samples=4, seqlen=32, epochs=1, batch_size=2, lr_quant=1e-3, lr_weight=1e-4)
    d = str(tmp_path / "run")
    first = pq.quantize(ck, calib, MIXED, prefix=False, train=train, checkpoint=pq.TrainCheckpoint(dir=d), **OPTS)
    resumed = pq.quantize(ck, calib, MIXED, prefix=False, train=train,
                          checkpoint=pq.TrainCheckpoint(dir=d, resume=True), **OPTS)
    np.testing.assert_array_equal(_logits(resumed, win), _logits(first, win))
    other = MIXED.replace(weight=QuantSpec(bits=4, granularity="channel", full_grid=True))
    with pytest.raises(UserError, match="differs in preset"):
        pq.quantize(ck, calib, other, prefix=False, train=train, checkpoint=pq.TrainCheckpoint(dir=d, resume=True), **OPTS)


def _flat_recipe():
    from prefixquant_jax.flatquant.recipe import FlatQuantRecipe
    return FlatQuantRecipe(sites=MIXED.sites[:1], weight=MIXED.weight)


@pytest.mark.parametrize("make,match", [
    (lambda: Capture(inner=MIXED, ranges=True), "Capture.inner"),
    (_flat_recipe, "FlatQuant runs through its presets"),
    (lambda: MIXED.replace(r4=False), r"QuantRecipe.r3 \(True\) and QuantRecipe.r4 \(False\)"),
    (lambda: QuantRecipe(sites=(("o_in", QuantSpec(bits=4, granularity="channel")),)), "static 'o_in' must have granularity tensor"),
    (lambda: QuantRecipe(sites=(("k_cache", QuantSpec(bits=4, granularity="token")),)), "tensor or head"),
    (lambda: QuantRecipe(sites=(("attn_out", QuantSpec(bits=4)),)), "unknown site 'attn_out'"),
    (lambda: QuantRecipe(sites=(("o_in", QuantSpec(bits=4)),) * 2), "'o_in' is given 2 times"),
    (lambda: QuantRecipe(weight=QuantSpec(bits=4, granularity="token")), "QuantRecipe.weight must be a static symmetric"),
    (lambda: QuantRecipe(weight=QuantSpec(bits=4, granularity="channel", symmetric=False)), "QuantRecipe.weight"),
    (lambda: 42, "a preset name, a Preset or a QuantRecipe, got int"),
])
def test_what_a_raw_recipe_cannot_be_is_a_user_error(data, make, match):
    with pytest.raises(UserError, match=match) as e:
        pq.quantize(data[0], data[1], make())
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)


def test_prefix_keyword_and_hand_built_presets(data):
    with pytest.raises(UserError, match="prefix= applies to a raw QuantRecipe; preset 'w4a4kv4-static'"):
        pq.quantize(data[0], data[1], "w4a4kv4-static", prefix=False)
    with pytest.raises(UserError, match="prefix must be True or False"):
        pq.quantize(data[0], data[1], MIXED, prefix="no")
    with pytest.raises(UserError, match=r"Preset.w_bits 4 contradicts its custom_recipe \(8\)"):
        pq.Preset(name="mine", custom_recipe=MIXED)
    p = pq.Preset.from_recipe(MIXED, name="mine", prefix=False)
    assert p.name == "mine" and not p.prefix and p.weight_spec() == MIXED.weight and p.is_static
    dyn = pq.Preset.from_recipe(QuantRecipe(sites=(("o_in", QuantSpec(bits=4, granularity="token", dynamic=True)),)))
    assert not dyn.is_static and not dyn.rotate and dyn.w_bits is None and dyn.recipe().weight is None
