"""Real int4 runtime (prefixquant_jax.runtime) against the fake-quant model it packs, on a tiny model.

Tolerance (real vs fake logits, and between the two real paths): |a - b| <= 1e-5 * (1 + max|b|).
Both models quantize with the same rounding (codes are equal), the integer GEMM accumulation is exact,
and the epilogue acc * s_x * s_w equals the fake (q_x s_x) @ (q_w s_w) up to float32 summation order,
so the logits agree to a few float32 ulps (~2e-7 seen). A larger gap would need a near-tie
rounding that flips one activation or KV code; with these fixed seeds none occurs. The test checks
that quantization is active: fake vs FP logits differ by far more than the tolerance.
"""
import dataclasses
import json
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import prefixquant_jax as pq
from checkpoints_convert import load_checkpoint
from prefixquant_jax.errors import UserError
from prefixquant_jax.eval.generate import greedy
from prefixquant_jax.model import with_recipe
from prefixquant_jax.quant.presets import get_preset
from prefixquant_jax.pipeline import QuantizeOptions, init_weight_scales, quantize
from prefixquant_jax.compiled import Compiled
from prefixquant_jax.runtime import RealCompiled, decode_step, pack, prefill
from tests.conftest import rng_tokens
from tests.test_cli import assert_one_line_error

TOL = 1e-5


def close(a, b, tol=TOL):
    a, b = np.asarray(a), np.asarray(b)
    err = np.abs(a - b).max()
    assert err <= tol * (1 + np.abs(b).max()), (err, np.abs(b).max())


@pytest.fixture(scope="module")
def tiny(tiny_dir, text_file):
    """(QuantizedModel w4a4kv4-static with prefix [1], tokenizer, checkpoint). To keep the test fast the
    static scales are the full ranges of the FP model on the calibration samples (calibrate's starting
    point, without its grid search): any valid scales exercise the same integer pipeline."""
    from prefixquant_jax.calibrate import _site_range, init_qparams, static_sites
    from prefixquant_jax.eval.data import calibration_samples, load_text, tokenize
    from prefixquant_jax.prefix.outliers import capture_token_ranges

    ck = load_checkpoint(tiny_dir)
    tok = ck.tokenizer()
    opts = QuantizeOptions(calib_data=text_file, calib_samples=2, calib_seqlen=16, prefix_ids=(1,), progress=False,
                           calibrate=False)
    qm = quantize(ck, tok, get_preset("w4a4kv4-static"), opts)
    calib = calibration_samples(tokenize(tok, load_text(text_file)), 2, 16, 0)
    ranges = capture_token_ranges(qm.fp_model, calib, qm.prefix_kv, progress=False)
    recipe = qm.model.layers[0].recipe
    for i, blk in enumerate(qm.model.layers):
        init_qparams(blk, recipe, {s: _site_range(ranges[s][0][i], ranges[s][1][i], recipe.spec(s)) for s in static_sites(recipe)})
    return qm, tok, ck


def variant(qm, init_weights=True, **kw):
    """qm with its preset changed (a clone of the model with the new recipe; the calibrated scales are
    reused: any valid scale exercises the same integer pipeline). W8 gets new 8-bit weight scales."""
    preset = dataclasses.replace(qm.preset, **kw)
    model = with_recipe(nnx.clone(qm.model), preset.recipe())
    if init_weights and preset.w_bits != qm.preset.w_bits:
        init_weight_scales(model, preset.weight_spec(), progress=False)
    return dataclasses.replace(qm, model=model, preset=preset)


def fake_logits(qm, toks, prefix=True):
    c = Compiled(qm.model)
    pkv = qm.prefix_kv if prefix else None
    P = 0 if pkv is None else pkv.length
    out, _ = c.logits(c.state, jnp.asarray(toks), c.cache(toks.shape[0], P + toks.shape[1], pkv), P)
    return np.asarray(out)


@pytest.mark.parametrize("kw", [{}, {"act_dynamic": True, "a_bits": 8}, {"w_bits": 8, "a_bits": 8, "kv_bits": 8},
                                {"act_dynamic": True, "kv_dynamic": True}, {"kv_dynamic": True, "kv_bits": 8}],
                         ids=["w4a4kv4-static", "w4a8kv4-dynamic", "w8a8kv8-static", "w4a4kv4-dynamic", "kv8-dynamic"])
def test_real_xla_matches_fake(tiny, kw):
    qm = variant(tiny[0], **kw) if kw else tiny[0]
    toks = np.stack([rng_tokens(12, 320, seed=s) for s in ((1,) if not kw else (1, 2))])  # batch 2 for variants
    fake = fake_logits(qm, toks)
    real, _ = prefill(pack(qm, backend="xla"), jnp.asarray(toks))
    close(real, fake)
    if not kw:  # the comparison is meaningful: quantization moves the logits far more than TOL
        fp = fake_logits(dataclasses.replace(qm, model=qm.fp_model), toks)
        assert np.abs(fp - fake).max() > 1e3 * TOL * (1 + np.abs(fake).max())


@pytest.mark.parametrize("with_prefix,kv_dynamic", [(True, False), (False, False), (True, True)],
                         ids=["prefix1", "prefix0", "prefix1-kv-dynamic"])
def test_prefill_then_decode_equals_one_prefill(tiny, with_prefix, kv_dynamic):
    qm = variant(tiny[0], act_dynamic=True, kv_dynamic=True) if kv_dynamic else tiny[0]
    qm = qm if with_prefix else dataclasses.replace(qm, prefix_kv=None)
    pm = pack(qm, backend="xla")
    assert pm.spec.prefix_len == (1 if with_prefix else 0)
    toks = jnp.asarray(rng_tokens(12, 320, seed=3)[None])
    full, cache_full = prefill(pm, toks)
    part, cache = prefill(pm, toks[:, :8], rows=12)
    outs = [np.asarray(part)]
    for i in range(8, 12):
        step, cache = decode_step(pm, toks[:, i:i + 1], cache, pm.spec.prefix_len + i)
        outs.append(np.asarray(step))
    close(np.concatenate(outs, axis=1), full)
    for a, b in zip(cache.k + cache.v, cache_full.k + cache_full.v):  # identical int4 cache rows
        np.testing.assert_array_equal(np.asarray(a)[:, :12], np.asarray(b)[:, :12])
    # dynamic KV: each row's (scale, zero) comes from that token's K/V, which one-token decode computes
    # in another float order than the 12-token prefill: equal up to float32 rounding, zeros exactly
    assert len(cache.k_sz) == (len(qm.model.layers) if kv_dynamic else 0)
    for a, b in zip(cache.k_sz + cache.v_sz, cache_full.k_sz + cache_full.v_sz):
        np.testing.assert_allclose(np.asarray(a)[:, :12], np.asarray(b)[:, :12], rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(a)[:, :12, :, 1], np.asarray(b)[:, :12, :, 1])
    close(full, fake_logits(qm, np.asarray(toks), prefix=with_prefix))


@pytest.mark.parametrize("kv_dynamic", [False, True], ids=["kv-static", "kv-dynamic"])
def test_kernels_backend_equals_xla(tiny, kv_dynamic):
    qm = variant(tiny[0], kv_dynamic=True) if kv_dynamic else tiny[0]
    toks = jnp.asarray(rng_tokens(6, 320, seed=4)[None])
    res = {}
    for backend in ("kernels", "xla"):  # kernels: Pallas in interpret mode on CPU
        pm = pack(qm, backend=backend)
        logits, cache = prefill(pm, toks[:, :5], rows=6)
        step, cache = decode_step(pm, toks[:, 5:6], cache, pm.spec.prefix_len + 5)
        res[backend] = (np.asarray(logits), np.asarray(step), [np.asarray(a) for a in cache.k + cache.v])
    close(res["kernels"][0], res["xla"][0])
    close(res["kernels"][1], res["xla"][1])
    for a, b in zip(res["kernels"][2], res["xla"][2]):  # kernels rounds the cache up to its block: 16 rows
        assert a.shape[1] == 16 and b.shape[1] == 6
        np.testing.assert_array_equal(a[:, :6], b)


def test_greedy_real_matches_fake(tiny):
    qm = tiny[0]
    prompt = [int(t) for t in rng_tokens(4, 320, seed=5)]
    fake = greedy(Compiled(qm.model), prompt, 8, prefix_kv=qm.prefix_kv)
    real = greedy(RealCompiled(pack(qm, backend="xla")), prompt, 8, prefix_kv=qm.prefix_kv)
    assert len(fake) == 8 and real == fake


@pytest.mark.parametrize("kw,msg", [({"kv_bits": None}, "kv cache is not quantized"), ({"w_bits": None}, "not quantized"),
                                    ({"w_bits": 3}, "4 or 8"), ({"a_bits": 6}, "4 or 8"), ({"kv_bits": 2}, "kv bits")],
                         ids=["kv-fp", "w-fp", "w3", "a6", "kv2"])
def test_unsupported_presets(tiny, kw, msg):
    qm = variant(tiny[0], init_weights=False, **kw)
    with pytest.raises(UserError, match=f"(?i)cannot run on the real int4 backend.*{msg}"):
        pack(qm)


def main_cli(capsys, *args):
    from prefixquant_jax.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return types.SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)


def test_cli_backend_real(tiny, tiny_dir, text_file, tmp_path, capsys):
    qm, tok, ck = tiny
    saved = pq.save(qm, str(tmp_path / "q"), tokenizer=tok)
    ev = ["eval", "--model", saved, "--data", text_file, "--seqlen", "12", "--max-windows", "1"]
    r = main_cli(capsys, *ev, "--json", str(tmp_path / "f.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = main_cli(capsys, *ev, "--backend", "real", "--json", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    fake, real = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "fr")
    assert real["backend"] == "real" and "real int4" in r.stdout
    assert real["ppl"] == pytest.approx(fake["ppl"], rel=1e-4)
    # --fake-matmul int: the runtime's numbers exactly; its eval log is not the default one's
    log = str(tmp_path / "int.jsonl")
    r = main_cli(capsys, *ev, "--fake-matmul", "int", "--eval-log", log, "--json", str(tmp_path / "i.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    exact = json.loads((tmp_path / "i.json").read_text())
    assert exact["fake_matmul"] == "int" and exact["ppl"] == real["ppl"]
    r = main_cli(capsys, *ev, "--eval-log", log)
    assert_one_line_error(r, "belongs to another evaluation")

    # a full-precision checkpoint, and a saved preset the runtime cannot run: one line each
    assert_one_line_error(main_cli(capsys, "eval", "--model", tiny_dir, "--backend", "real"), "full-precision checkpoint")
    a6 = quantize(ck, tok, get_preset("quarot-w4a4kv4", a_bits=6), QuantizeOptions(progress=False))
    bad = pq.save(a6, str(tmp_path / "a6"), tokenizer=tok)
    assert_one_line_error(main_cli(capsys, "generate", "--model", bad, "--backend", "real", "--prompt", "x"),
                          "cannot run on the real int4 backend")


@pytest.mark.parametrize("kw", [{}, pytest.param({"act_dynamic": True, "a_bits": 8}, marks=pytest.mark.slow),
                                pytest.param({"w_bits": 8, "a_bits": 8, "kv_bits": 8}, marks=pytest.mark.slow),
                                {"act_dynamic": True, "kv_dynamic": True}],
                         ids=["w4a4kv4-static", "w4a8kv4-dynamic", "w8a8kv8-static", "w4a4kv4-dynamic"])
def test_int_matmul_fake_equals_real_exactly(tiny, kw):
    """With QuantRecipe(int_matmul=True) the fake model computes each quantized linear as the runtime does
    (exact integer accumulation, then * s_x * s_w): its logits equal the XLA integer runtime's bit for bit,
    and stay within float32 rounding of the default float fake-quant product."""
    qm = variant(tiny[0], **kw) if kw else tiny[0]
    model = with_recipe(nnx.clone(qm.model), qm.model.layers[0].recipe.replace(int_matmul=True))
    exact = dataclasses.replace(qm, model=model)
    toks = np.stack([rng_tokens(12, 320, seed=s) for s in (1, 2)])
    real, _ = prefill(pack(qm, backend="xla"), jnp.asarray(toks))
    np.testing.assert_array_equal(fake_logits(exact, toks), np.asarray(real))
    close(fake_logits(exact, toks), fake_logits(qm, toks))
    prompt = [int(t) for t in rng_tokens(4, 320, seed=5)]
    assert greedy(Compiled(model), prompt, 8, prefix_kv=qm.prefix_kv) == \
        greedy(RealCompiled(pack(qm, backend="xla")), prompt, 8, prefix_kv=qm.prefix_kv)
