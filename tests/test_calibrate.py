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
