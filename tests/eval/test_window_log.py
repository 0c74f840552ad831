"""Resumable perplexity (--eval-log): same ppl as one pass, survives a torn line, extends to more
windows, refuses another model's log."""
import json

import numpy as np
import pytest

from prefixquant_jax.errors import UserError
from prefixquant_jax.eval.perplexity import perplexity
from prefixquant_jax.compiled import Compiled
from tests.test_cli import run_cli


@pytest.fixture(scope="module")
def setup(tiny_dir):
    from checkpoints_convert import load_checkpoint
    from prefixquant_jax.model import Llama

    ck = load_checkpoint(tiny_dir)
    model = Llama.from_params(ck.config, ck.params)
    rng = np.random.default_rng(0)
    win = rng.integers(3, ck.config.vocab_size, size=(5, 24)).astype(np.int32)
    return Compiled(model), win


def test_log_resume_and_extend(setup, tmp_path):
    compiled, win = setup
    ref = perplexity(compiled, win, batch_size=2, progress=False)
    log = tmp_path / "ppl.jsonl"
    first = perplexity(compiled, win[:4], batch_size=2, progress=False, log_path=str(log))
    assert first["windows_from_log"] == 0 and len(log.read_text().splitlines()) == 3  # header + 2 batches
    with open(log, "a") as f:
        f.write('{"start": 4, "cou')  # a kill mid-write
    full = perplexity(compiled, win, batch_size=2, progress=False, log_path=str(log))
    assert full["windows_from_log"] == 4
    assert full["ppl"] == pytest.approx(ref["ppl"], rel=1e-12)
    again = perplexity(compiled, win, batch_size=2, progress=False, log_path=str(log))
    assert again["windows_from_log"] == 5 and again["ppl"] == full["ppl"]
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["start"] for r in lines[1:]] == [0, 2, 4]


def test_other_tokens_are_recomputed(setup, tmp_path):
    compiled, win = setup
    log = tmp_path / "ppl.jsonl"
    perplexity(compiled, win[:2], batch_size=1, progress=False, log_path=str(log))
    other = win[::-1].copy()
    r = perplexity(compiled, other[:2], batch_size=1, progress=False, log_path=str(log))
    assert r["windows_from_log"] == 0  # same positions, different tokens: nothing reused


def test_refuses_another_model(setup, tmp_path):
    compiled, win = setup
    log = tmp_path / "ppl.jsonl"
    perplexity(compiled, win[:1], progress=False, log_path=str(log))
    state = compiled.state
    emb = state["embed"]
    old = emb[...]
    emb[...] = old * 1.0001
    try:
        with pytest.raises(UserError, match="another evaluation"):
            perplexity(compiled, win[:1], progress=False, log_path=str(log))
        with pytest.raises(UserError, match="another evaluation"):
            perplexity(compiled, win[:1], batch_size=2, progress=False, log_path=str(log))
    finally:
        emb[...] = old
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "something-else"}\n')
    with pytest.raises(UserError, match="not a perplexity log"):
        perplexity(compiled, win[:1], progress=False, log_path=str(bad))


def test_cli_eval_log(tiny_dir, text_file, tmp_path):
    log, out = tmp_path / "l.jsonl", tmp_path / "r.json"
    args = ("eval", "--model", tiny_dir, "--data", text_file, "--seqlen", "32", "--max-windows", "3",
            "--eval-log", str(log), "--json", str(out))
    r1 = run_cli(*args)
    assert r1.returncode == 0, r1.stderr[-2000:]
    first = json.loads(out.read_text())
    r2 = run_cli(*args)
    assert r2.returncode == 0, r2.stderr[-2000:]
    second = json.loads(out.read_text())
    assert second["windows_from_log"] == 3 and second["ppl"] == first["ppl"]
