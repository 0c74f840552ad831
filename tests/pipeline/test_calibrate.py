"""The block-by-block initialisation (prefixquant_jax/pipeline/calibrate.py) on the tiny model: each rule does
what it claims on the calibration data it saw, and the options are checked."""
import json
import types

import numpy as np
import pytest

import prefixquant_jax as pq
from prefixquant_jax.errors import UserError
from tests.conftest import TINY_CALIB
from tests.cli.util import assert_one_line_error, main_cli


def test_default_rules(tiny_quantized, tiny_ck):
    qm = tiny_quantized("w4a4kv4-static")
    rules = qm.report["calibration_rules"]
    assert (rules["weight_clip"], rules["kv_rule"]) == ("output", "head")
    for rep in qm.report["calibration"]:
        # output-aware: the chosen clip never has a larger output error than the data-free one (same grid,
        # same Gram matrices; 1e-6: float32 sums) and is strictly smaller for some linear
        for name, e in rep["weights"].items():
            assert e["output"] <= e["mse"] * (1 + 1e-6), (rep["layer"], name, e)
        assert any(e["output"] < e["mse"] * (1 - 1e-4) for e in rep["weights"].values())
        for site in ("k_cache", "v_cache"):  # one clip ratio per KV head
            assert len(rep["ratios"][site]) == tiny_ck.config.num_kv_heads
        assert np.isfinite(rep["grid_loss"]) and rep["grid_loss"] <= rep["grid_loss_init"] * (1 + 1e-6)
    blk = qm.model.layers[0]
    assert blk.recipe.spec("qkv_in").full_grid and blk.recipe.weight.full_grid
    assert blk.qparams["k_cache"]["scale"][...].shape == (tiny_ck.config.num_kv_heads, 1)


def test_old_rules_and_search_variants(tiny_quantized):
    old = tiny_quantized("w4a4kv4-static", weight_clip="mse", kv_rule="site")
    rep = old.report["calibration"][0]
    assert "weights" not in rep and isinstance(rep["ratios"]["k_cache"], float)
    alone = tiny_quantized("w4a4kv4-static", search="alone", target="local")
    for rep in alone.report["calibration"]:
        assert np.isfinite(rep["out_mse"]) and np.isfinite(rep["grid_loss"])
    # the per-site search swaps the block's recipe and must put the full one back
    assert all(b.recipe == pq.preset("w4a4kv4-static") for b in alone.model.layers)


def test_dynamic_preset_gets_output_aware_weights(tiny_quantized, tiny_ck):
    qm = tiny_quantized("quarot-w4a4kv4")
    reps = qm.report["calibration"]
    assert len(reps) == tiny_ck.config.num_layers and all("ratios" not in r for r in reps)
    assert all(e["output"] <= e["mse"] * (1 + 1e-6) for r in reps for e in r["weights"].values())


def test_rules_reject_unknown_values():
    import dataclasses

    from prefixquant_jax.pipeline.calibrate import calibrate

    with pytest.raises(UserError, match="kv_rule"):
        pq.QuantizeOptions(kv_rule="tensor")
    with pytest.raises(UserError, match="search"):
        dataclasses.replace(pq.QuantizeOptions(), search="joint")
    # GPTQ works on weight scales: calibrate refuses it without a weight rule, before touching anything
    with pytest.raises(ValueError, match="GPTQ"):
        calibrate(None, types.SimpleNamespace(recipe=None), np.zeros((1, 2, 4), np.float32),
                  pq.QuantizeOptions(gptq=True), weight_clip=None, static=True, progress=False)


def test_cli_rule_flags(tiny_dir, text_file, tmp_path, capsys):
    common = ["--model", tiny_dir, "--calib-data", text_file, "--calib-samples", "4", "--calib-seqlen", "16",
              "--prefix-ids", "1", "--no-eval"]
    out = tmp_path / "q.json"
    r = main_cli(capsys, "quantize", "--preset", "w4a4kv4-static", *common, "--weight-clip", "mse", "--kv-clip",
                 "site", "--clip-search", "alone", "--clip-target", "local", "--grid", "narrow", "--json", out)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["report"]["calibration_rules"] == {"weight_clip": "mse", "gptq": False, "kv_rule": "site",
                                                  "search": "alone", "target": "local", "grid_samples": 2}
    assert_one_line_error(main_cli(capsys, "quantize", "--preset", "flatquant-w4a4kv4", *common, "--grid", "narrow"),
                          "--grid")


def test_gptq_quantized_inputs_match_a_sequential_reference(tiny_quantized):
    """gptq_inputs "quantized": o's Hessian comes from block 0 run with q|k|v already GPTQ'd and the dynamic
    quantizers on. Reference: the same Gram computed here from the RTN model's FP kernels (RTN leaves kernels
    as they are) with the GPTQ q|k|v swapped in, then plain GPTQ of o on it (tolerance: float32 Grams
    summed in another order; rtol 1e-4 on the kernel, 1e-3 of a step away from any rounding tie)."""
    from flax import nnx

    from prefixquant_jax.nn.decoder import with_recipe
    from prefixquant_jax.pipeline.blocks import BlockRunner
    from prefixquant_jax.quant.gptq import gptq_with_factor, inverse_hessian_factor

    rtn = tiny_quantized("quarot-w4a4kv4")
    seq = tiny_quantized("quarot-w4a4kv4", gptq=True, gptq_inputs="quantized")
    fp = tiny_quantized("quarot-w4a4kv4", gptq=True)
    assert seq.report["calibration_rules"]["gptq_inputs"] == "quantized"
    b_seq, b_fp = seq.model.layers[0], fp.model.layers[0]
    for name in ("q", "k", "v"):  # first group: both modes see the same FP Gram
        np.testing.assert_array_equal(np.asarray(b_seq.linear_module(name).kernel[...]),
                                      np.asarray(b_fp.linear_module(name).kernel[...]))
    assert not np.array_equal(np.asarray(b_seq.attn.o.kernel[...]), np.asarray(b_fp.attn.o.kernel[...]))

    ref_block = nnx.clone(rtn.model.layers[0])  # a copy: the shared model stays as it is
    for name in ("q", "k", "v"):
        ref_block.linear_module(name).kernel[...] = b_seq.linear_module(name).kernel[...]
    recipe = ref_block.recipe
    dyn = tuple((s, sp) for s, sp in recipe.sites if sp.dynamic)
    assert dyn, "the preset has dynamic quantizers"
    x = np.asarray(np.asarray(rtn.model.embed[...])[TINY_CALIB], np.float32)
    runner = BlockRunner(rtn.config, rtn.prefix_len, TINY_CALIB.shape[1])
    gram = runner.grams(with_recipe(ref_block, recipe.replace(sites=dyn, weight=None)), x, 8)["o_in"]
    w = np.asarray(rtn.model.layers[0].attn.o.kernel[...], np.float32)
    scale = np.asarray(b_seq.qparams["o"]["scale"][...], np.float32)
    want = gptq_with_factor(w, inverse_hessian_factor(gram, 0.01, True), scale, recipe.weight)
    got = np.asarray(b_seq.attn.o.kernel[...], np.float32)
    close = np.isclose(got, want, rtol=1e-4, atol=1e-3 * float(scale.max()))
    assert close.mean() > 0.995, close.mean()  # a rounding tie may flip a code and GPTQ carries it on


def test_gptq_inputs_option_is_checked():
    with pytest.raises(UserError, match="gptq_inputs"):
        pq.QuantizeOptions(gptq_inputs="quantized")
    with pytest.raises(UserError, match="gptq_inputs"):
        pq.QuantizeOptions(gptq=True, gptq_inputs="both")
