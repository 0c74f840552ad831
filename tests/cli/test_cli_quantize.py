"""`prefixquant quantize` / `analyze` end to end on a tiny model (in this process); preset and flag errors."""
import json

import pytest

from tests.cli.util import assert_one_line_error, main_cli


def common(tiny_dir, text_file):
    return ["--model", tiny_dir, "--calib-data", text_file, "--calib-samples", "4", "--calib-seqlen", "32",
            "--outlier-samples", "4", "--eval-data", text_file, "--seqlen", "32", "--max-windows", "2"]


@pytest.mark.parametrize("preset", ["w4a4kv4-static", "quarot-w4a4kv4"])
def test_quantize_json(tiny_dir, text_file, tmp_path, preset, capsys):
    out = tmp_path / "q.json"
    r = main_cli(capsys, "quantize", "--preset", preset, *common(tiny_dir, text_file), "--eta", "4", "--json", out)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("ppl", "fp_ppl", "prefix_ids", "recipe", "windows", "seqlen"):
        assert key in res
    assert "preset" not in res and "prefix_tokens" not in res
    assert res["recipe"] == preset and res["windows"] == 2
    assert (res["prefix_ids"][:1] == [1]) == (preset == "w4a4kv4-static")
    assert res["ppl"] > 1 and res["fp_ppl"] > 1
    assert "x FP" in r.stdout  # the table
    if preset == "w4a4kv4-static":
        cal = res["report"]["calibration"]
        assert len(cal) == 2 and all(c["grid_loss"] <= c["grid_loss_init"] + 1e-12 for c in cal)


def test_unknown_preset(tiny_dir, capsys):
    assert_one_line_error(main_cli(capsys, "quantize", "--model", tiny_dir, "--preset", "w3a3"), "unknown preset")


def test_bad_prefix_ids(tiny_dir, capsys):
    assert_one_line_error(main_cli(capsys, "quantize", "--model", tiny_dir, "--preset", "w4a4kv4-static",
                                   "--prefix-ids", "1,x"), "comma-separated")


def test_analyze_plot(tiny_dir, text_file, tmp_path, capsys):
    png, js = tmp_path / "o.png", tmp_path / "a.json"
    r = main_cli(capsys, "analyze", "--model", tiny_dir, "--calib-data", text_file, "--calib-seqlen", "32",
                 "--outlier-samples", "4", "--eta", "4", "--plot", png, "--json", js)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(js.read_text())
    assert res["prefix_ids"][0] == 1 and png.stat().st_size > 10_000
    assert len(res["down_in"]["max_ratio_per_layer"]) == 2
