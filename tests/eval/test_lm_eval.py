"""lm-eval-harness: our `prefixquant-jax` model against lm-eval's own `hf` backend (FP), real vs fake
behind the prefix, static shapes, generation, the CLI and the shipped LAMBADA-style task."""
import json
import os

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from prefixquant_jax.eval.lm_eval import PrefixQuantLM, buckets_for  # noqa: E402
from tests.conftest import TINY_TEXT, needs_smollm2, smollm2_path  # noqa: E402
from tests.cli.util import assert_one_line_error, main_cli  # noqa: E402

MC_JSONL = os.path.join(os.path.dirname(__file__), "data", "mc_basic.jsonl")
MC_YAML = """task: mc_basic
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: answer
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
N_MC = 36


@pytest.fixture(scope="module")
def mc_dir(tmp_path_factory):
    """An include dir with the 36-item hand-written multiple-choice task `mc_basic`."""
    d = tmp_path_factory.mktemp("mc_task")
    (d / "mc_basic.yaml").write_text(MC_YAML.format(path=MC_JSONL))
    return str(d)


@pytest.fixture(scope="module")
def tm(mc_dir):
    from prefixquant_jax.cli.lm_eval import task_manager
    return task_manager([mc_dir], ["mc_basic", "lambada_wikitext2"])  # local tasks only: fast


def evaluate(model, tm, tasks=("mc_basic",), limit=None, **model_args):
    """(results, {(task, doc_id, choice): (loglikelihood, is_greedy)}) of one simple_evaluate run."""
    kw = dict(model=model, model_args=model_args) if isinstance(model, str) else dict(model=model)
    out = lm_eval.simple_evaluate(**kw, tasks=list(tasks), task_manager=tm, limit=limit, log_samples=True,
                                  bootstrap_iters=0)
    per = {}
    for task, samples in out["samples"].items():
        for s in samples:
            for i, r in enumerate(s["resps"]):
                per[(task, s["doc_id"], i)] = (float(r[0][0]), bool(r[0][1]))
    return out["results"], per


def compare(ours, theirs, metrics=("acc,none", "acc_norm,none")):
    (r_ours, p_ours), (r_hf, p_hf) = ours, theirs
    assert p_ours.keys() == p_hf.keys() and p_ours
    diff = max(abs(p_ours[k][0] - p_hf[k][0]) for k in p_hf)
    assert diff < 1e-4, diff
    assert sum(p_ours[k][1] != p_hf[k][1] for k in p_hf) == 0
    for task in r_hf:
        for m in metrics:
            if m in r_hf[task]:
                exact = not m.startswith("perplexity")  # exp(-mean ll): equal to float rounding only
                assert r_ours[task][m] == (r_hf[task][m] if exact else pytest.approx(r_hf[task][m], rel=1e-5)), (task, m)
    return diff


def assert_bucketed(lm):
    allowed = {(lm.rows_for(L), L) for L in buckets_for(lm.max_length)}
    assert lm.shapes_run and lm.shapes_run <= allowed, lm.shapes_run


def test_tiny_matches_hf_backend(tiny_dir, tm):
    hf = evaluate("hf", tm, pretrained=tiny_dir, dtype="float32", device="cpu", batch_size=8)
    lm = PrefixQuantLM(pretrained=tiny_dir, batch_size=8)
    ours = evaluate(lm, tm)
    assert len(ours[1]) == 4 * N_MC
    compare(ours, hf)
    assert_bucketed(lm)


def test_tiny_lambada_matches_hf_backend(tiny_dir, tm):
    """The shipped last-word task (passages longer than max_length 128 are left-truncated, as lm-eval does)."""
    hf = evaluate("hf", tm, tasks=("lambada_wikitext2",), limit=12, pretrained=tiny_dir, dtype="float32",
                  device="cpu", batch_size=4, max_length=128)
    lm = PrefixQuantLM(pretrained=tiny_dir, batch_size=4, max_length=128)
    compare(evaluate(lm, tm, tasks=("lambada_wikitext2",), limit=12), hf, metrics=("acc,none", "perplexity,none"))
    assert (4, 128) in lm.shapes_run  # passages longer than max_length: left-truncated into the last bucket


@needs_smollm2
@pytest.mark.smollm2
@pytest.mark.slow  # transformers dequantizes the GGUF in Python: ~1 min of loading on a busy 2-core machine
def test_smollm2_matches_hf_backend(tm):
    path = smollm2_path()
    hf = evaluate("hf", tm, pretrained=os.path.dirname(path), gguf_file=os.path.basename(path), dtype="float32",
                  device="cpu", batch_size=8)
    ours = evaluate(PrefixQuantLM(pretrained="smollm2", batch_size=8), tm)
    diff = compare(ours, hf)
    print(f"smollm2 mc_basic acc {ours[0]['mc_basic']['acc,none']:.4f}, max |dll| {diff:.2e}")
    assert ours[0]["mc_basic"]["acc,none"] > 0.5  # an easy task for an instruct model; random is 0.25


def test_shared_rows_and_buckets_change_nothing(tiny_dir):
    """Batched (shared rows, padded rows, two buckets) == one request per call; ids differ by length."""
    lm = PrefixQuantLM(pretrained=tiny_dir, batch_size=2)
    long_ctx = [int(t) for t in range(3, 103)]
    reqs = [(None, [1, 5, 6], [7]), (None, [1, 5, 6], [8]), (None, [1, 5], [6, 7]), (None, [1, 5], [6, 9]),
            (None, long_ctx, [40, 41]), (None, [9], [10, 11, 12])]
    batched = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    alone = [lm._loglikelihood_tokens([r], disable_tqdm=True)[0] for r in reqs]
    assert [g for _, g in batched] == [g for _, g in alone]
    assert [ll for ll, _ in batched] == pytest.approx([ll for ll, _ in alone], abs=1e-5)
    assert len({round(ll, 3) for ll, _ in batched}) == len(reqs)  # six different requests, six different scores
    assert lm.shapes_run == {(2, 32), (2, 128)}


def test_scored_positions_match_full_logits(tiny_dir):
    """The head on the continuation positions only (K = 8, 32 and L) == log-softmax of the whole logits."""
    import jax
    import numpy as np

    from prefixquant_jax.eval import forward

    lm = PrefixQuantLM(pretrained=tiny_dir, batch_size=4)
    assert lm.P == 0
    reqs = [(None, [1] + list(range(5, 25)), list(range(30, 50))), (None, [1, 5], [6]), (None, [1, 7, 8], [9, 10, 11]),
            (None, [1], list(range(60, 140)))]  # continuations of 20, 1, 3 and 80 tokens
    got = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    for (_, ctx, cont), (ll, greedy) in zip(reqs, got):
        whole = ctx + cont
        logits, _ = forward.logits(lm.graphdef, lm.state, np.asarray([whole[:-1]], np.int32),
                                   lm.loaded.model.init_cache(1, len(whole) - 1))
        logp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
        pos = np.arange(len(ctx) - 1, len(whole) - 1)
        assert ll == pytest.approx(float(logp[pos, cont].sum()), abs=1e-4)
        assert greedy == bool((np.asarray(logits[0]).argmax(-1)[pos] == cont).all())
    with pytest.raises(Exception, match="kernels must be auto, mosaic or triton"):
        PrefixQuantLM(pretrained=tiny_dir, kernels="cuda")


def test_rolling_matches_hf_backend(tiny_dir):
    from lm_eval.models.huggingface import HFLM

    texts = [TINY_TEXT[:2000], "A small model reads.", TINY_TEXT[100:400]]
    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=0) for t in texts]
    hf = HFLM(pretrained=tiny_dir, dtype="float32", device="cpu", batch_size=4, max_length=64)
    lm = PrefixQuantLM(pretrained=tiny_dir, batch_size=4, max_length=64)
    ours, theirs = lm.loglikelihood_rolling(reqs, disable_tqdm=True), hf.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert len(lm.tok_encode(texts[0])) > 3 * 64  # several windows
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-4)
    assert_bucketed(lm)


def test_generate_until_matches_hf_backend(tiny_dir):
    from lm_eval.models.huggingface import HFLM

    ctxs = ["The quick brown", "A small model", "The lazy dog. The"]
    kw = {"until": ["model", "\n"], "max_gen_toks": 12, "do_sample": False}
    reqs = [Instance(request_type="generate_until", doc={}, arguments=(c, dict(kw)), idx=0) for c in ctxs]
    hf = HFLM(pretrained=tiny_dir, dtype="float32", device="cpu", batch_size=1)
    lm = PrefixQuantLM(pretrained=tiny_dir)
    ours = lm.generate_until(reqs, disable_tqdm=True)
    assert ours == hf.generate_until(reqs, disable_tqdm=True)
    assert all("model" not in s and "\n" not in s for s in ours)
    # without stop strings: exactly max_gen_toks tokens (no EOS in a random model's top-1 here), as our greedy()
    from prefixquant_jax.eval.generate import greedy
    ids = lm.tok_encode(ctxs[0])
    ref = greedy(lm.loaded.model, ids, 12, eos_id=lm.eot_token_id)
    assert lm.greedy(ids, 12) == ref


@pytest.fixture(scope="module")
def saved_tiny(tiny_quantized, tiny_ck, tmp_path_factory):
    """The session's tiny w4a4kv4-static model (prefix [BOS]), saved with the tiny tokenizer and loaded back by
    its directory like a `quantize --save` model."""
    import prefixquant_jax as pq

    return pq.save(tiny_quantized("w4a4kv4-static"), str(tmp_path_factory.mktemp("q") / "w4a4kv4-static"),
                   tokenizer=tiny_ck.tokenizer())


def test_real_backend_matches_fake_behind_prefix(saved_tiny, tm):
    fake_lm = PrefixQuantLM(pretrained=saved_tiny, backend="fake")
    assert fake_lm.P > 0  # scored behind the FP prefix
    fake = evaluate(fake_lm, tm)
    real = evaluate(PrefixQuantLM(pretrained=saved_tiny, backend="real"), tm)
    acc_f, acc_r = fake[0]["mc_basic"]["acc,none"], real[0]["mc_basic"]["acc,none"]
    assert abs(acc_f - acc_r) <= 1 / N_MC + 1e-9, (acc_f, acc_r)
    assert max(abs(fake[1][k][0] - real[1][k][0]) for k in fake[1]) < 1e-2
    # the fake model with the runtime's integer products gives the real runtime's numbers
    exact = evaluate(PrefixQuantLM(pretrained=saved_tiny, backend="fake", fake_matmul="int"), tm)
    assert max(abs(exact[1][k][0] - real[1][k][0]) for k in real[1]) < 1e-5
    assert exact[0]["mc_basic"]["acc,none"] == acc_r


@needs_smollm2
@pytest.mark.smollm2
@pytest.mark.slow  # quantizes SmolLM2 (small budget) and runs the CPU integer runtime: minutes
def test_smollm2_real_backend_matches_fake(tm, tmp_path):
    from prefixquant_jax.cli.main import main

    out = str(tmp_path / "w4a4kv4-static")
    assert main(["quantize", "--model", "smollm2", "--preset", "w4a4kv4-static", "--calib-samples", "4",
                 "--grid-samples", "1", "--no-eval", "--save", out]) == 0
    fake = evaluate(PrefixQuantLM(pretrained=out, backend="fake"), tm)[0]["mc_basic"]["acc,none"]
    real = evaluate(PrefixQuantLM(pretrained=out, backend="real"), tm)[0]["mc_basic"]["acc,none"]
    print(f"smollm2 w4a4kv4-static mc_basic acc: fake {fake:.4f} real {real:.4f}")
    assert abs(fake - real) <= 1 / N_MC + 1e-9


def test_cli_table_and_json(tiny_dir, mc_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    r = main_cli(capsys, "lm-eval", "--model", tiny_dir, "--tasks", "mc_basic,lambada_wikitext2", "--include-path", mc_dir,
                 "--limit", "6", "--bootstrap-iters", "0", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "|mc_basic" in r.stdout and "|lambada_wikitext2" in r.stdout and "acc_norm" in r.stdout
    res = json.loads(out.read_text())
    assert res["backend"] == "fake" and res["prefix_len"] == 0 and res["kernels"] == "auto"
    assert res["results"]["mc_basic"]["acc,none"] in [k / 6 for k in range(7)]
    assert res["results"]["lambada_wikitext2"]["perplexity,none"] > 1
    assert res["n-samples"]["mc_basic"]["effective"] == 6


def test_cli_errors(tiny_dir, mc_dir, tmp_path, capsys):
    assert_one_line_error(main_cli(capsys, "lm-eval", "--model", tiny_dir, "--tasks", "mc_basik", "--include-path", mc_dir),
                          "unknown lm-eval task 'mc_basik'")
    assert_one_line_error(main_cli(capsys, "lm-eval", "--model", tiny_dir, "--tasks", "mc_basic", "--include-path",
                                   str(tmp_path / "nope")), "is not an existing directory")
    d = tmp_path / "hub"
    d.mkdir()
    yaml = MC_YAML.format(path=MC_JSONL).replace("task: mc_basic", "task: hub_only")
    yaml = yaml.replace(f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {MC_JSONL}\n",
                        "dataset_path: no-such-org/no-such-dataset\n")
    assert "no-such-org" in yaml
    (d / "hub_only.yaml").write_text(yaml)
    assert_one_line_error(main_cli(capsys, "lm-eval", "--model", tiny_dir, "--tasks", "hub_only", "--include-path", str(d)),
                          "must already be in the local HF datasets cache")
    assert_one_line_error(main_cli(capsys, "lm-eval", "--model", tiny_dir, "--tasks", "mc_basic", "--include-path", mc_dir,
                                   "--backend", "real"), "full-precision checkpoint")


def test_shipped_task_is_rebuilt_identically():
    from prefixquant_jax.eval import lambada_task

    assert lambada_task.main(["--check"]) == 0
    items = [json.loads(line) for line in open(os.path.join(lambada_task.TASK_DIR, lambada_task.JSONL))]
    assert 400 <= len(items) <= lambada_task.MAX_ITEMS
    for it in items:
        context, _, target = it["text"].rpartition(" ")
        assert target.isalpha() and target.lower() in context.lower()
        assert lambada_task.MIN_WORDS <= len(it["text"].split(" ")) <= lambada_task.MAX_WORDS


def test_readme_snippet_runs_on_the_tiny_model(tiny_dir, capsys):
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"<!-- lm-eval-snippet -->\n```python\n(.*?)```", readme, re.S).group(1)
    assert 'pretrained="smollm2"' in code
    ns = {}
    exec(compile(code.replace('pretrained="smollm2"', f"pretrained={tiny_dir!r}", 1), "README.md", "exec"), ns)
    assert ns["out"]["n-samples"]["lambada_wikitext2"]["effective"] == 20
    assert 0.0 <= float(capsys.readouterr().out.strip().splitlines()[-1]) <= 1.0
