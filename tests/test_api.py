"""The flat API (`import prefixquant_jax as pq`, api.py): `pq.quantize` does the whole job, training included,
from token arrays, with a preset name or a raw QuantRecipe: the same numbers as the CLI (which only parses flags
and calls it); a training run is checkpointed and resumed (TrainCheckpoint); bad options raise UserError (a
ValueError) with a one-line message that names the option, not a flag. What the stages do: tests/pipeline/."""
import dataclasses
import json
import math

import numpy as np
import pytest

import prefixquant_jax as pq
from prefixquant_jax.errors import UserError
from prefixquant_jax.quant.recipe import Capture, QuantRecipe
from prefixquant_jax.quant.spec import QuantSpec
from tests.conftest import TINY_CALIB
from tests.cli.util import assert_one_line_error, main_cli
from tests.pipeline.helpers import logits

TRAIN = dict(samples=8, seqlen=32, epochs=2, batch_size=2, lr_quant=1e-3, lr_weight=1e-4)
TRAIN_FLAGS = ["--train", "--train-samples", "8", "--train-seqlen", "32", "--epochs", "2", "--train-batch-size", "2",
               "--lr-quant", "1e-3", "--lr-weight", "1e-4"]
# a researcher's recipe: 8-bit static, per-group dynamic, per-tensor KV, no prefix (tests/pipeline/test_stages.py)
MIXED = QuantRecipe(sites=(("qkv_in", QuantSpec(bits=8, granularity="tensor")),
                           ("down_in", QuantSpec(bits=4, granularity="group", group_size=16, dynamic=True)),
                           ("k_cache", QuantSpec(bits=4, granularity="head", symmetric=False)),
                           ("v_cache", QuantSpec(bits=4, granularity="tensor", symmetric=False))),
                    weight=QuantSpec(bits=8, granularity="channel", full_grid=True), rotate=True, prefix=False)


@pytest.fixture(scope="module")
def data(tiny_ck, text_file):
    """(checkpoint, calibration tokens [4, 32], training tokens [8, 32], eval windows [2, 32]), drawn as the CLI
    draws them from --calib-data (seed 0)."""
    from prefixquant_jax.eval.data import calibration_samples, load_text, tokenize, windows

    ids = tokenize(tiny_ck.tokenizer(), load_text(text_file))
    return tiny_ck, calibration_samples(ids, 4, 32, 0), calibration_samples(ids, 8, 32, 0), windows(ids, 32, 2)


def test_library_training_is_the_cli(tiny_dir, text_file, tmp_path, data, capsys):
    ck, calib, train_tokens, win = data
    out, saved, cli_dir = tmp_path / "q.json", tmp_path / "saved", tmp_path / "cli-run"
    r = main_cli(capsys, "quantize", "--preset", "w4a4kv4-static", "--model", tiny_dir, "--calib-data", text_file,
                 "--calib-samples", "4", "--calib-seqlen", "32", "--outlier-samples", "4", "--eta", "4",
                 "--eval-data", text_file, "--seqlen", "32", "--max-windows", "2", "--no-fp", *TRAIN_FLAGS,
                 "--train-dir", cli_dir, "--save", saved, "--json", out)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())

    lib_dir = tmp_path / "lib-run"
    identity = {"model": tiny_dir, "calib_data": text_file}
    qm = pq.quantize(ck, calib, "w4a4kv4-static", train=pq.TrainConfig(**TRAIN), train_tokens=train_tokens, eta=4,
                     outlier_samples=4, checkpoint=pq.TrainCheckpoint(dir=str(lib_dir), identity=identity))
    blocks = lambda rep: [(b["loss_before"], b["loss_after"]) for b in rep["train"]["blocks"]]
    assert blocks(res["report"]) == blocks(qm.report) and len(blocks(qm.report)) == 2
    assert res["recipe"] == qm.recipe.name == "w4a4kv4-static" and "preset" not in res and "prefix_tokens" not in res
    assert res["prefix_ids"] == qm.report["prefix_ids"] and res["prefix_ids"][:1] == [1]
    assert pq.perplexity(qm, win)["ppl"] == res["ppl"]  # the CLI's number, bit for bit
    np.testing.assert_array_equal(logits(pq.load(str(saved)).model, win[:1]), logits(qm.model, win[:1]))
    # the library names the run as the CLI does: either can resume the other's directory
    fps = [json.loads((d / "train.json").read_text())["fingerprint"] for d in (cli_dir, lib_dir)]
    assert fps[0] == fps[1] and "prefix_ids" in fps[0] and "recipe" in fps[0]

    # a resume of the CLI's finished run through the library: calibration restored, blocks restored, same model
    again = pq.quantize(ck, calib, "w4a4kv4-static", train=pq.TrainConfig(**TRAIN), train_tokens=train_tokens, eta=4,
                        outlier_samples=4, checkpoint=pq.TrainCheckpoint(dir=str(cli_dir), resume=True,
                                                                         identity=identity))
    assert blocks(again.report) == blocks(qm.report)
    np.testing.assert_array_equal(logits(again.model, win[:1]), logits(qm.model, win[:1]))


def _one_line(e: UserError, field: str):
    msg = str(e)
    assert isinstance(e, ValueError) and "\n" not in msg and "--" not in msg, msg
    assert field in msg and field in e.fields, (msg, e.fields)


@pytest.mark.parametrize("make,field", [
    (lambda: pq.QuantizeOptions(eta=1.0), "QuantizeOptions.eta"),
    (lambda: pq.QuantizeOptions(grid_samples=0), "QuantizeOptions.grid_samples"),
    (lambda: pq.QuantizeOptions(gptq_damp=0.0), "QuantizeOptions.gptq_damp"),
    (lambda: pq.QuantizeOptions(kv_rule="tensor"), "QuantizeOptions.kv_rule"),
    (lambda: pq.QuantizeOptions(search="joint"), "QuantizeOptions.search"),
    (lambda: pq.QuantizeOptions(prefix_ids=("x",)), "QuantizeOptions.prefix_ids"),
    (lambda: dataclasses.replace(pq.QuantizeOptions(), weight_clip="max"), "QuantizeOptions.weight_clip"),
    (lambda: pq.QuantizeOptions(flatquant=pq.TrainConfig()), "QuantizeOptions.flatquant"),
    (lambda: pq.TrainConfig(samples=0), "TrainConfig.samples"),
    (lambda: pq.TrainConfig(samples=2, batch_size=4), "TrainConfig.batch_size"),
    (lambda: pq.TrainConfig(lr_quant=math.nan), "TrainConfig.lr_quant"),
    (lambda: pq.TrainConfig(epochs=1.5), "TrainConfig.epochs"),
    (lambda: pq.FlatOptions(lr=0.0), "FlatOptions.lr"),
    (lambda: pq.FlatOptions(param="cayley"), "FlatOptions.param"),
    (lambda: pq.FlatOptions(alpha=1.5), "FlatOptions.alpha"),
    (lambda: pq.FlatOptions(train=pq.TrainConfig()), "FlatOptions.train"),
    (lambda: pq.TrainCheckpoint(dir=""), "TrainCheckpoint.dir"),
])
def test_options_check_themselves(make, field):
    with pytest.raises(UserError) as e:
        make()
    _one_line(e.value, field)


def test_quantize_rejects_bad_calls_before_any_slow_stage(data, tmp_path):
    ck, calib, train_tokens, _ = data
    cases = [
        (dict(weight_clp="mse"), "weight_clp"),
        (dict(train=pq.TrainConfig(**TRAIN)), "TrainConfig.samples"),  # train_tokens default: calib [4, 32], not 8
        (dict(checkpoint=pq.TrainCheckpoint(dir=str(tmp_path / "d"))), "TrainConfig"),
        (dict(gptq=True, recipe="fp"), "QuantizeOptions.gptq"),
        (dict(prefix_ids=(1, 999)), "vocabulary"),
        (dict(flatquant=pq.FlatOptions()), "QuantizeOptions.flatquant"),
        (dict(options=dict(eta=4)), "QuantizeOptions, got dict"),
    ]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("a run")
    cases.append((dict(train=pq.TrainConfig(**TRAIN), train_tokens=train_tokens,
                       checkpoint=pq.TrainCheckpoint(dir=str(tmp_path / "full"))), "TrainCheckpoint.resume"))
    cases.append((dict(train=pq.TrainConfig(**TRAIN), train_tokens=train_tokens,
                       checkpoint=pq.TrainCheckpoint(dir=str(tmp_path / "none"), resume=True)), "no train.json"))
    for kw, pattern in cases:
        recipe = kw.pop("recipe", "w4a4kv4-static")
        with pytest.raises(UserError) as e:
            pq.quantize(ck, calib, recipe, **kw)
        assert isinstance(e.value, ValueError) and "\n" not in str(e.value) and "--" not in str(e.value), str(e.value)
        assert pattern in str(e.value), (kw, str(e.value))
    with pytest.raises(UserError, match="integer array"):
        pq.quantize(ck, calib[0], "w4a4kv4-static")
    assert (tmp_path / "full" / "x").read_text() == "a run"


def test_cli_says_its_flags(tiny_dir, capsys):
    from prefixquant_jax.cli.flags import flag_error

    e = flag_error(UserError("TrainConfig.batch_size 4 exceeds the 2 training samples (TrainConfig.samples)",
                             "TrainConfig.batch_size", "TrainConfig.samples"))
    assert str(e) == "--train-batch-size 4 exceeds the 2 training samples (--train-samples)"
    assert_one_line_error(main_cli(capsys, "quantize", "--model", tiny_dir, "--preset", "w4a4kv4-static", "--eta", "1"),
                          "--eta: must be a number > 1")


def test_a_training_directory_of_the_old_format_is_refused_on_resume(data, tmp_path):
    """A run checkpointed before the recipes ("prefixquant-train/1") cannot be resumed: one line saying so."""
    ck, _, _, _ = data
    d = tmp_path / "old-run"
    (d / "init").mkdir(parents=True)  # its calibrated scales: the resume skips calibration, then reads train.json
    meta = {"format": "prefixquant-train/1", "fingerprint": {"preset": {"name": "w4a4kv4-static"}}, "blocks": []}
    (d / "train.json").write_text(json.dumps(meta))
    train = pq.TrainConfig(samples=4, seqlen=16, epochs=1, batch_size=2)
    with pytest.raises(UserError) as e:
        pq.quantize(ck, TINY_CALIB, "w4a4kv4-static", prefix_ids=(1,), train=train, weight_clip="mse",
                    checkpoint=pq.TrainCheckpoint(dir=str(d), resume=True))
    msg = str(e.value)
    assert "\n" not in msg and "prefixquant-train/1" in msg and "cannot resume" in msg, msg
    assert json.loads((d / "train.json").read_text()) == meta  # left as it was


def test_a_presets_recipe_given_raw_quantizes_as_the_preset(tiny_quantized):
    """A preset is a named QuantRecipe: the same fields built by hand (another name) quantize bit for bit alike."""
    p = pq.preset("w4a4kv4-static")
    raw = QuantRecipe(sites=p.sites, weight=p.weight, rotate=True, prefix=True)
    assert raw.name == "custom" and raw != p and raw == p.replace(name="custom", description="")
    win = np.stack([np.arange(3, 35), np.arange(40, 72)]).astype(np.int32)
    qp, qr = tiny_quantized("w4a4kv4-static"), tiny_quantized(raw)
    assert qr.recipe is raw and qr.report["recipe"] == "custom" and qr.recipe.is_static
    r = qr.recipe
    assert (r.rotate, r.prefix, r.w_bits, r.a_bits, r.kv_bits) == (True, True, 4, 4, 4)
    assert qr.report["prefix_ids"] == qp.report["prefix_ids"] and qr.prefix_len == qp.prefix_len > 0
    np.testing.assert_array_equal(logits(qr.model, win), logits(qp.model, win))
    assert pq.perplexity(qr, win)["ppl"] == pq.perplexity(qp, win)["ppl"]


def test_a_mixed_recipe_saves_and_reloads(tiny_quantized, tmp_path):
    qm = tiny_quantized(MIXED, gptq=True)
    assert qm.recipe is MIXED and qm.prefix_len == 0 and qm.prefix_kv is None
    win = np.stack([np.arange(3, 35), np.arange(40, 72)]).astype(np.int32)
    ppl = pq.perplexity(qm, win)["ppl"]
    assert np.isfinite(ppl)
    again = pq.load(pq.save(qm, str(tmp_path / "mixed")))
    assert again.recipe == MIXED
    np.testing.assert_array_equal(logits(again.model, win), logits(qm.model, win))
    assert pq.perplexity(again, win)["ppl"] == ppl


def test_a_recipes_training_run_resumes(data, tmp_path):
    """The training fingerprint holds the recipe; a resume of the same run matches it (JSON lists vs tuples). A run
    of another recipe is refused: tests/pipeline/test_train.py::test_resume_needs_the_same_recipe."""
    ck = data[0]
    train = pq.TrainConfig(samples=4, seqlen=16, epochs=1, batch_size=2, lr_quant=1e-3, lr_weight=1e-4)
    d = str(tmp_path / "run")
    win = TINY_CALIB[:2]
    first = pq.quantize(ck, TINY_CALIB, MIXED, train=train, checkpoint=pq.TrainCheckpoint(dir=d))
    resumed = pq.quantize(ck, TINY_CALIB, MIXED, train=train, checkpoint=pq.TrainCheckpoint(dir=d, resume=True))
    np.testing.assert_array_equal(logits(resumed.model, win), logits(first.model, win))
    assert resumed.report["train"]["blocks"] == first.report["train"]["blocks"]  # restored, not trained again


@pytest.mark.parametrize("make,match", [
    (lambda: QuantRecipe(sites=(("o_in", QuantSpec(bits=4, granularity="channel")),)), "static 'o_in' must have granularity tensor"),
    (lambda: QuantRecipe(sites=(("k_cache", QuantSpec(bits=4, granularity="token")),)), "tensor or head"),
    (lambda: QuantRecipe(sites=(("attn_out", QuantSpec(bits=4)),)), "unknown site 'attn_out'"),
    (lambda: QuantRecipe(sites=(("o_in", QuantSpec(bits=4)),) * 2), "'o_in' is given 2 times"),
    (lambda: QuantRecipe(weight=QuantSpec(bits=4, granularity="token")), "QuantRecipe.weight must be a static symmetric"),
    (lambda: QuantRecipe(weight=QuantSpec(bits=4, granularity="channel", symmetric=False)), "QuantRecipe.weight"),
    (lambda: QuantRecipe(matmul="fast"), "QuantRecipe.matmul"),
    (lambda: QuantRecipe(prefix="no"), "QuantRecipe.prefix"),
    (lambda: MIXED.replace(weight=None), None),  # valid: the weights stay FP
    (lambda: 42, "a preset name or a QuantRecipe, got int"),
    (lambda: Capture(inner=MIXED, ranges=True), "a preset name or a QuantRecipe, got Capture"),  # a wrapper
])
def test_what_a_raw_recipe_cannot_be_is_a_user_error(data, make, match):
    recipe = make()
    if match is None:
        recipe.check()
        return
    with pytest.raises(UserError, match=match) as e:
        pq.quantize(data[0], data[1], recipe)
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)


def test_prefix_belongs_to_the_recipe(data):
    with pytest.raises(UserError, match="quantize option 'prefix' is unknown"):
        pq.quantize(data[0], data[1], "w4a4kv4-static", prefix=False)
    no_prefix = pq.preset("w4a4kv4-static", prefix=False)
    assert not no_prefix.prefix and no_prefix.name == "w4a4kv4-static" and no_prefix.is_static
    assert no_prefix.replace(prefix=True) == pq.PRESETS["w4a4kv4-static"]
    dyn = QuantRecipe(sites=(("o_in", QuantSpec(bits=4, granularity="token", dynamic=True)),))
    assert not dyn.is_static and not dyn.rotate and dyn.w_bits is None and dyn.weight is None and dyn.a_bits == 4
    assert (MIXED.w_bits, MIXED.a_bits, MIXED.kv_bits, MIXED.is_static) == (8, 4, 4, True)  # the lowest bits
