"""The block-by-block initialisation (prefixquant_jax/calibrate.py) on the tiny model: each rule does what it
claims on the calibration data it saw, and the options are checked."""
import dataclasses
import json

import numpy as np
import pytest

from prefixquant_jax.calibrate import CalibConfig
from prefixquant_jax.errors import UserError
from prefixquant_jax.quant.presets import get_preset
from prefixquant_jax.pipeline import QuantizeOptions, quantize
from tests.test_cli import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def ck(tiny_dir):
    from checkpoints_convert import load_checkpoint

    return load_checkpoint(tiny_dir)


def _quantize(ck, text_file, preset="w4a4kv4-static", **kw):
    opts = QuantizeOptions(calib_data=text_file, calib_samples=4, calib_seqlen=32, prefix_ids=(1,), progress=False, **kw)
    return quantize(ck, ck.tokenizer(), get_preset(preset), opts)


def test_default_rules(ck, text_file):
    qm = _quantize(ck, text_file)
    rules = qm.report["calibration_rules"]
    assert (rules["weight_clip"], rules["kv_rule"]) == ("output", "head")
    for rep in qm.report["calibration"]:
        # output-aware: the chosen clip never has a larger output error than the data-free one (same grid,
        # same Gram matrices; 1e-6: float32 sums) and is strictly smaller for some linear
        for name, e in rep["weights"].items():
            assert e["output"] <= e["mse"] * (1 + 1e-6), (rep["layer"], name, e)
        assert any(e["output"] < e["mse"] * (1 - 1e-4) for e in rep["weights"].values())
        for site in ("k_cache", "v_cache"):  # one clip ratio per KV head
            assert len(rep["ratios"][site]) == ck.config.num_kv_heads
        assert np.isfinite(rep["grid_loss"]) and rep["grid_loss"] <= rep["grid_loss_init"] * (1 + 1e-6)
    blk = qm.model.layers[0]
    assert blk.recipe.spec("qkv_in").full_grid and blk.recipe.weight.full_grid
    assert blk.qparams["k_cache"]["scale"][...].shape == (ck.config.num_kv_heads, 1)


def test_old_rules_and_search_variants(ck, text_file):
    old = _quantize(ck, text_file, weight_clip="mse", kv_rule="site")
    rep = old.report["calibration"][0]
    assert "weights" not in rep and isinstance(rep["ratios"]["k_cache"], float)
    alone = _quantize(ck, text_file, search="alone", target="local")
    for rep in alone.report["calibration"]:
        assert np.isfinite(rep["out_mse"]) and np.isfinite(rep["grid_loss"])
    # the per-site search swaps the block's recipe and must put the full one back
    recipe = get_preset("w4a4kv4-static").recipe()
    assert all(b.recipe == recipe for b in alone.model.layers)


def test_dynamic_preset_gets_output_aware_weights(ck, text_file):
    qm = _quantize(ck, text_file, preset="quarot-w4a4kv4")
    reps = qm.report["calibration"]
    assert len(reps) == ck.config.num_layers and all("ratios" not in r for r in reps)
    assert all(e["output"] <= e["mse"] * (1 + 1e-6) for r in reps for e in r["weights"].values())


def test_calib_config_rejects_unknown_rules():
    with pytest.raises(UserError, match="kv_rule"):
        CalibConfig(kv_rule="tensor")
    with pytest.raises(UserError, match="GPTQ"):
        CalibConfig(gptq=True)
    with pytest.raises(UserError, match="search"):
        dataclasses.replace(CalibConfig(), search="joint")


def test_cli_rule_flags(tiny_dir, text_file, tmp_path):
    common = ["--model", tiny_dir, "--calib-data", text_file, "--calib-samples", "4", "--calib-seqlen", "32",
              "--prefix-ids", "1", "--no-eval"]
    out = tmp_path / "q.json"
    r = run_cli("quantize", "--preset", "w4a4kv4-static", *common, "--weight-clip", "mse", "--kv-clip", "site",
                "--clip-search", "alone", "--clip-target", "local", "--grid", "narrow", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rules = json.loads(out.read_text())["report"]["calibration_rules"]
    assert rules == {"weight_clip": "mse", "gptq": False, "kv_rule": "site", "search": "alone", "target": "local",
                     "grid_samples": 2}
    assert_one_line_error(run_cli("quantize", "--preset", "flatquant-w4a4kv4", *common, "--grid", "narrow"), "--grid")


def test_gptq_quantized_inputs_match_a_sequential_reference(ck):
    """gptq_inputs "quantized": o's Hessian comes from block 0 run with q|k|v already GPTQ'd and the dynamic
    quantizers on. Reference: the same Gram computed here from the RTN model's FP kernels (RTN leaves kernels
    as they are) with the GPTQ q|k|v swapped in, then plain GPTQ of o on it (tolerance: float32 Grams
    summed in another order; rtol 1e-4 on the kernel, 1e-3 of a step away from any rounding tie)."""
    import copy

    from prefixquant_jax.compiled_block import CompiledBlock
    from prefixquant_jax.model import with_recipe
    from prefixquant_jax.quant.gptq import gptq_with_factor, inverse_hessian_factor

    rng = np.random.default_rng(0)
    tokens = rng.integers(3, ck.config.vocab_size, size=(4, 32))
    preset = get_preset("quarot-w4a4kv4")

    def run(**kw):
        opts = QuantizeOptions(progress=False, **kw)
        return quantize(ck, None, preset, opts, calib_tokens=tokens)

    rtn, seq, fp = run(), run(gptq=True, gptq_inputs="quantized"), run(gptq=True)
    assert seq.report["calibration_rules"]["gptq_inputs"] == "quantized"
    b_seq, b_fp = seq.model.layers[0], fp.model.layers[0]
    for name in ("q", "k", "v"):  # first group: both modes see the same FP Gram
        np.testing.assert_array_equal(np.asarray(b_seq.linear_module(name).kernel[...]),
                                      np.asarray(b_fp.linear_module(name).kernel[...]))
    assert not np.array_equal(np.asarray(b_seq.attn.o.kernel[...]), np.asarray(b_fp.attn.o.kernel[...]))

    ref_block = copy.deepcopy(rtn.model.layers[0])
    for name in ("q", "k", "v"):
        ref_block.linear_module(name).kernel[...] = b_seq.linear_module(name).kernel[...]
    recipe = ref_block.recipe
    dyn = tuple((s, sp) for s, sp in recipe.sites if sp.dynamic)
    assert dyn, "the preset has dynamic quantizers"
    x = np.asarray(np.asarray(rtn.model.embed[...])[tokens], np.float32)
    gram = CompiledBlock(ck.config, None, 32).grams(with_recipe(ref_block, recipe.replace(sites=dyn, weight=None)),
                                                    0, x, 8)["o_in"]
    w = np.asarray(rtn.model.layers[0].attn.o.kernel[...], np.float32)
    scale = np.asarray(b_seq.qparams["o"]["scale"][...], np.float32)
    want = gptq_with_factor(w, inverse_hessian_factor(gram, 0.01, True), scale, recipe.weight)
    got = np.asarray(b_seq.attn.o.kernel[...], np.float32)
    close = np.isclose(got, want, rtol=1e-4, atol=1e-3 * float(scale.max()))
    assert close.mean() > 0.995, close.mean()  # a rounding tie may flip a code and GPTQ carries it on


def test_gptq_inputs_option_is_checked():
    with pytest.raises(UserError, match="gptq_inputs"):
        QuantizeOptions(gptq_inputs="quantized")
    with pytest.raises(UserError, match="gptq_inputs"):
        QuantizeOptions(gptq=True, gptq_inputs="both")
