"""`prefixquant_jax.quantize` does the whole job, training included, from token arrays: the same numbers as the
CLI (which now only parses flags and calls it) and as the former two-step path (quantize, then finetune on text);
bad options raise UserError (a ValueError) with a one-line message that names the option, not a flag."""
import dataclasses
import json
import math

import jax
import numpy as np
import pytest

import prefixquant_jax as pq
from prefixquant_jax.errors import UserError
from tests.test_cli import assert_one_line_error, run_cli

TRAIN = dict(samples=8, seqlen=32, epochs=2, batch_size=2, lr_quant=1e-3, lr_weight=1e-4)
TRAIN_FLAGS = ["--train", "--train-samples", "8", "--train-seqlen", "32", "--epochs", "2", "--train-batch-size", "2",
               "--lr-quant", "1e-3", "--lr-weight", "1e-4"]


@pytest.fixture(scope="module")
def data(tiny_dir, text_file):
    """(checkpoint, tokenizer, calibration tokens [4, 32], training tokens [8, 32], eval windows [2, 32]),
    drawn as the CLI draws them from --calib-data (seed 0)."""
    from prefixquant_jax.eval.data import calibration_samples, load_text, tokenize, windows

    ck = pq.load_checkpoint(tiny_dir)
    tok = ck.tokenizer()
    ids = tokenize(tok, load_text(text_file))
    return (ck, tok, calibration_samples(ids, 4, 32, 0), calibration_samples(ids, 8, 32, 0),
            windows(ids, 32, 2))


def _logits(qm, tokens):
    return np.asarray(jax.jit(qm.apply)(qm.split()[1], tokens))


def test_library_training_is_the_cli_and_the_two_step_path(tiny_dir, text_file, tmp_path, data):
    ck, tok, calib, train_tokens, win = data
    out, saved, cli_dir = tmp_path / "q.json", tmp_path / "saved", tmp_path / "cli-run"
    r = run_cli("quantize", "--preset", "w4a4kv4-static", "--model", tiny_dir, "--calib-data", text_file,
                "--calib-samples", "4", "--calib-seqlen", "32", "--outlier-samples", "4", "--eta", "4",
                "--eval-data", text_file, "--seqlen", "32", "--max-windows", "2", "--no-fp", *TRAIN_FLAGS,
                "--train-dir", str(cli_dir), "--save", str(saved), "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())

    lib_dir = tmp_path / "lib-run"
    qm = pq.quantize(ck, calib, "w4a4kv4-static", train=pq.TrainConfig(**TRAIN), train_tokens=train_tokens, eta=4,
                     outlier_samples=4, tokenizer=tok,
                     checkpoint=pq.TrainCheckpoint(dir=str(lib_dir), identity={"model": tiny_dir, "calib_data": text_file}))
    blocks = lambda rep: [(b["loss_before"], b["loss_after"]) for b in rep["train"]["blocks"]]
    assert blocks(res["report"]) == blocks(qm.report) and len(blocks(qm.report)) == 2
    assert res["prefix_ids"] == res["prefix_tokens"] == qm.report["prefix_ids"] and res["prefix_ids"][:1] == [1]
    assert pq.perplexity(qm, win)["ppl"] == res["ppl"]  # the CLI's number, bit for bit
    np.testing.assert_array_equal(_logits(pq.load(str(saved)), win[:1]), _logits(qm, win[:1]))
    # the library names the run as the CLI does: either can resume the other's directory
    fps = [json.loads((d / "train.json").read_text())["fingerprint"] for d in (cli_dir, lib_dir)]
    assert fps[0] == fps[1] and "prefix_ids" in fps[0]

    # the former path: quantize, then fine-tune on text (train.finetune draws the same tokens)
    from prefixquant_jax.pipeline import QuantizeOptions
    from prefixquant_jax.pipeline import quantize as pipeline_quantize
    from prefixquant_jax.train import finetune

    opts = QuantizeOptions(calib_data=text_file, calib_samples=4, calib_seqlen=32, outlier_samples=4, eta=4, progress=False)
    two = pipeline_quantize(ck, tok, pq.get_preset("w4a4kv4-static"), opts)
    two.report["train"] = finetune(two, tok, pq.TrainConfig(**TRAIN), calib_data=text_file, progress=False)
    assert blocks(two.report) == blocks(qm.report)
    np.testing.assert_array_equal(_logits(two, win[:1]), _logits(qm, win[:1]))

    # a resume of the CLI's finished run through the library: calibration restored, blocks restored, same model
    again = pq.quantize(ck, calib, "w4a4kv4-static", train=pq.TrainConfig(**TRAIN), train_tokens=train_tokens, eta=4,
                        outlier_samples=4, checkpoint=pq.TrainCheckpoint(
                            dir=str(cli_dir), resume=True, identity={"model": tiny_dir, "calib_data": text_file}))
    np.testing.assert_array_equal(_logits(again, win[:1]), _logits(qm, win[:1]))

    # a model saved before the rename (report key prefix_tokens) loads with prefix_ids
    again.report["prefix_tokens"] = again.report.pop("prefix_ids")
    old = pq.load(pq.save(again, str(tmp_path / "old-report"), tokenizer=tok))
    assert old.report["prefix_ids"] == qm.report["prefix_ids"] and "prefix_tokens" not in old.report


def test_flatquant_trains_through_the_library_as_through_its_hook(text_file, data):
    """FlatQuant's training inside quantize(train=...) on token arrays == the hook that trained on text."""
    from prefixquant_jax.pipeline import QuantizeOptions
    from prefixquant_jax.pipeline import quantize as pipeline_quantize
    from prefixquant_jax.train import finetune

    ck, tok, calib, _, win = data
    cfg = pq.TrainConfig(samples=4, seqlen=32, epochs=1, batch_size=2)  # finetune draws calib's 4 x 32 (seed 0)
    qm = pq.quantize(ck, calib, "flatquant-w4a4kv4", train=cfg, train_tokens=calib)
    hook = lambda q, groups: finetune(q, tok, cfg, calib_data=text_file, groups=groups, progress=False)
    opts = QuantizeOptions(calib_data=text_file, calib_samples=4, calib_seqlen=32, progress=False,
                           flatquant=pq.FlatOptions(train=hook))
    old = pipeline_quantize(ck, tok, pq.get_preset("flatquant-w4a4kv4"), opts)
    losses = lambda q: [(b["loss_before"], b["loss_after"]) for b in q.report["train"]["blocks"]]
    assert losses(qm) == losses(old) and len(losses(qm)) == 2
    assert qm.report["train"]["groups"] == old.report["train"]["groups"] and qm.report["flatquant"]["merged"]
    np.testing.assert_array_equal(_logits(qm, win[:1]), _logits(old, win[:1]))


def _one_line(e: UserError, field: str):
    msg = str(e)
    assert isinstance(e, ValueError) and "\n" not in msg and "--" not in msg, msg
    assert field in msg and field in e.fields, (msg, e.fields)


@pytest.mark.parametrize("make,field", [
    (lambda: pq.QuantizeOptions(eta=1.0), "QuantizeOptions.eta"),
    (lambda: pq.QuantizeOptions(calib_samples=0), "QuantizeOptions.calib_samples"),
    (lambda: pq.QuantizeOptions(gptq_damp=0.0), "QuantizeOptions.gptq_damp"),
    (lambda: pq.QuantizeOptions(kv_rule="tensor"), "QuantizeOptions.kv_rule"),
    (lambda: pq.QuantizeOptions(search="joint"), "QuantizeOptions.search"),
    (lambda: pq.QuantizeOptions(prefix_ids=("x",)), "QuantizeOptions.prefix_ids"),
    (lambda: dataclasses.replace(pq.QuantizeOptions(), weight_clip="max"), "QuantizeOptions.weight_clip"),
    (lambda: pq.TrainConfig(samples=0), "TrainConfig.samples"),
    (lambda: pq.TrainConfig(samples=2, batch_size=4), "TrainConfig.batch_size"),
    (lambda: pq.TrainConfig(lr_quant=math.nan), "TrainConfig.lr_quant"),
    (lambda: pq.TrainConfig(epochs=1.5), "TrainConfig.epochs"),
    (lambda: pq.FlatOptions(lr=0.0), "FlatOptions.lr"),
    (lambda: pq.FlatOptions(param="cayley"), "FlatOptions.param"),
    (lambda: pq.FlatOptions(train=pq.TrainConfig()), "FlatOptions.train"),
    (lambda: pq.TrainCheckpoint(dir=""), "TrainCheckpoint.dir"),
])
def test_options_check_themselves(make, field):
    with pytest.raises(UserError) as e:
        make()
    _one_line(e.value, field)


def test_quantize_rejects_bad_calls_before_any_slow_stage(data, tmp_path):
    ck, _, calib, train_tokens, _ = data
    cases = [
        (dict(weight_clp="mse"), "weight_clp"),
        (dict(calib_samples=8), "does not apply"),
        (dict(train=pq.TrainConfig(**TRAIN)), "TrainConfig.samples"),  # train_tokens default: calib [4, 32], not 8
        (dict(checkpoint=pq.TrainCheckpoint(dir=str(tmp_path / "d"))), "TrainConfig"),
        (dict(gptq=True, preset="fp"), "QuantizeOptions.gptq"),
        (dict(prefix_ids=(1, 999)), "vocabulary"),
    ]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("a run")
    cases.append((dict(train=pq.TrainConfig(**TRAIN), train_tokens=train_tokens,
                       checkpoint=pq.TrainCheckpoint(dir=str(tmp_path / "full"))), "TrainCheckpoint.resume"))
    for kw, pattern in cases:
        preset = kw.pop("preset", "w4a4kv4-static")
        with pytest.raises(UserError) as e:
            pq.quantize(ck, calib, preset, **kw)
        assert isinstance(e.value, ValueError) and "\n" not in str(e.value) and "--" not in str(e.value), str(e.value)
        assert pattern in str(e.value), (kw, str(e.value))
    with pytest.raises(UserError, match="integer array"):
        pq.quantize(ck, calib[0], "w4a4kv4-static")
    assert (tmp_path / "full" / "x").read_text() == "a run"


def test_cli_says_its_flags(tiny_dir):
    from prefixquant_jax.cli_quant import flag_error

    e = flag_error(UserError("TrainConfig.batch_size 4 exceeds the 2 training samples (TrainConfig.samples)",
                             "TrainConfig.batch_size", "TrainConfig.samples"))
    assert str(e) == "--train-batch-size 4 exceeds the 2 training samples (--train-samples)"
    assert_one_line_error(run_cli("quantize", "--model", tiny_dir, "--preset", "w4a4kv4-static", "--eta", "1"),
                          "--eta must be a number > 1")


def test_old_training_directories_still_resume(tmp_path):
    """train.json files written before the rename keep their key prefix_tokens; a resume reads it as prefix_ids."""
    from prefixquant_jax.train.finetune import FINGERPRINT_ALIASES
    from prefixquant_jax.train.state_io import TrainDir

    TrainDir(str(tmp_path), {"prefix_tokens": [1, 7], "model": "m"}, resume=False).close()
    TrainDir(str(tmp_path), {"prefix_ids": [1, 7], "model": "m"}, resume=True, aliases=FINGERPRINT_ALIASES).close()
    with pytest.raises(UserError, match="differs in prefix_ids"):
        TrainDir(str(tmp_path), {"prefix_ids": [1], "model": "m"}, resume=True, aliases=FINGERPRINT_ALIASES)
