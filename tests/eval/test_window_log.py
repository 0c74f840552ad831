"""Resumable perplexity (--eval-log, format prefixquant-ppl-log/2): same ppl as one pass, survives a torn line,
extends to more windows, refuses another model's log and a log of the old format (one line)."""
import json

import numpy as np
import pytest
from flax import nnx

from prefixquant_jax.errors import UserError
from prefixquant_jax.eval.perplexity import perplexity
from prefixquant_jax.eval.window_log import FORMAT
from tests.cli.util import assert_one_line_error, main_cli


@pytest.fixture(scope="module")
def setup(tiny_ck):
    """The tiny FP Decoder (this module's own) and 5 random windows of 24 tokens."""
    from prefixquant_jax.nn.decoder import Decoder

    model = Decoder(tiny_ck.config, tiny_ck.params)
    rng = np.random.default_rng(0)
    win = rng.integers(3, tiny_ck.config.vocab_size, size=(5, 24)).astype(np.int32)
    return model, win


def test_log_resume_and_extend(setup, tmp_path):
    model, win = setup
    ref = perplexity(model, win, batch_size=2, progress=False)
    log = tmp_path / "ppl.jsonl"
    first = perplexity(model, win[:4], batch_size=2, progress=False, log_path=str(log))
    assert first["windows_from_log"] == 0 and len(log.read_text().splitlines()) == 3  # header + 2 batches
    assert json.loads(log.read_text().splitlines()[0])["format"] == FORMAT == "prefixquant-ppl-log/2"
    with open(log, "a") as f:
        f.write('{"start": 4, "cou')  # a kill mid-write
    full = perplexity(model, win, batch_size=2, progress=False, log_path=str(log))
    assert full["windows_from_log"] == 4
    assert full["ppl"] == pytest.approx(ref["ppl"], rel=1e-12)
    again = perplexity(model, win, batch_size=2, progress=False, log_path=str(log))
    assert again["windows_from_log"] == 5 and again["ppl"] == full["ppl"]
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["start"] for r in lines[1:]] == [0, 2, 4]


def test_other_tokens_are_recomputed(setup, tmp_path):
    model, win = setup
    log = tmp_path / "ppl.jsonl"
    perplexity(model, win[:2], batch_size=1, progress=False, log_path=str(log))
    other = win[::-1].copy()
    r = perplexity(model, other[:2], batch_size=1, progress=False, log_path=str(log))
    assert r["windows_from_log"] == 0  # same positions, different tokens: nothing reused


def test_refuses_another_model(setup, tmp_path):
    from prefixquant_jax.nn.decoder import with_prefix
    from prefixquant_jax.prefix.prefix_kv import compute_prefix_kv

    model, win = setup
    log = tmp_path / "ppl.jsonl"
    perplexity(model, win[:1], progress=False, log_path=str(log))
    other = nnx.clone(model)  # a copy: the module's model stays as it is
    other.embed[...] = other.embed[...] * 1.0001
    with pytest.raises(UserError, match="another evaluation"):
        perplexity(other, win[:1], progress=False, log_path=str(log))
    with pytest.raises(UserError, match="another evaluation"):
        perplexity(model, win[:1], batch_size=2, progress=False, log_path=str(log))
    prefixed = with_prefix(model, compute_prefix_kv(model, [1]))  # the same weights behind a prefix
    with pytest.raises(UserError, match="another evaluation"):
        perplexity(prefixed, win[:1], progress=False, log_path=str(log))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "something-else"}\n')
    with pytest.raises(UserError, match="not a perplexity log"):
        perplexity(model, win[:1], progress=False, log_path=str(bad))


def test_old_format_refused_in_one_line(setup, tiny_dir, text_file, tmp_path, capsys):
    """A log of format 1 (written before the prefix was model state) is refused, never continued."""
    model, win = setup
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"format": "prefixquant-ppl-log/1", "fingerprint": "0" * 64}) + "\n"
                   + json.dumps({"start": 0, "count": 1, "tokens": "x", "nll": 1.0}) + "\n")
    with pytest.raises(UserError, match="format 'prefixquant-ppl-log/1'"):
        perplexity(model, win[:1], progress=False, log_path=str(old))
    r = main_cli(capsys, "eval", "--model", tiny_dir, "--data", text_file, "--seqlen", "32", "--max-windows", "1",
                 "--eval-log", old)
    assert_one_line_error(r, "--eval-log")
    assert "prefixquant-ppl-log/1" in r.stderr and "give a new file" in r.stderr


def test_cli_eval_log(tiny_dir, text_file, tmp_path, capsys):
    log, out = tmp_path / "l.jsonl", tmp_path / "r.json"
    args = ("eval", "--model", tiny_dir, "--data", text_file, "--seqlen", "32", "--max-windows", "3",
            "--eval-log", log, "--json", out)
    r1 = main_cli(capsys, *args)
    assert r1.returncode == 0, r1.stderr[-2000:]
    first = json.loads(out.read_text())
    r2 = main_cli(capsys, *args)
    assert r2.returncode == 0, r2.stderr[-2000:]
    second = json.loads(out.read_text())
    assert second["windows_from_log"] == 3 and second["ppl"] == first["ppl"]
