"""FlatQuant in the real int4 runtime (runtime/flat.py) against the merged fake-quant FlatQuant model.

The runtime applies the same online transforms with the recipe's own functions and quantizes with the
same rules (LAC included), so integer codes are equal and the logits agree to float32 summation order:
the tolerance of tests/runtime/test_runtime.py, |a - b| <= 1e-5 * (1 + max|b|).
"""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from prefixquant_jax.calibrate import _site_range, init_qparams, static_sites
from prefixquant_jax.errors import UserError
from prefixquant_jax.flatquant import FlatQuantRecipe, merge_model
from prefixquant_jax.model import Llama
from prefixquant_jax.prefix.outliers import capture_token_ranges
from prefixquant_jax.prefix.prefix_kv import compute_prefix_kv
from prefixquant_jax.quant.presets import get_preset
from prefixquant_jax.quant.spec import QuantSpec
from prefixquant_jax.pipeline import QuantizedModel
from prefixquant_jax.compiled import Compiled
from prefixquant_jax.runtime import decode_step, pack, prefill
from tests.conftest import rng_tokens
from tests.flatquant.test_merge import QSITES, W4, flat_model
from tests.runtime.test_runtime import close

A4_STATIC = QuantSpec(bits=4, granularity="tensor", symmetric=True)
KV4_STATIC = QuantSpec(bits=4, granularity="head", symmetric=False)
STATIC_SITES = tuple((s, A4_STATIC) for s in ("qkv_in", "o_in", "up_gate_in", "down_in")) + (
    ("k_cache", KV4_STATIC), ("v_cache", KV4_STATIC))


@pytest.fixture(scope="module")
def ck(tiny_dir):
    from checkpoints_convert import load_checkpoint
    return load_checkpoint(tiny_dir)


def flat_qm(ck, *, static: bool, param: str = "inverse", seed: int = 0):
    """A merged FlatQuant QuantizedModel on the tiny model. static: the flatquant-w4a4kv4-static-prefix
    layout (FP prefix [1], static scales from the transformed model's full ranges, KV in the original
    space); else flatquant-w4a4kv4 (dynamic A and KV with LAC, no prefix)."""
    recipe = FlatQuantRecipe(sites=STATIC_SITES if static else QSITES, weight=W4, param=param, kv_original_space=static)
    q = flat_model(ck, recipe, seed=seed)
    q, _ = merge_model(q)
    fp = Llama.from_params(ck.config, ck.params)
    prefix = compute_prefix_kv(fp, [1]) if static else None
    if static:  # any valid scales exercise the integer pipeline: the full ranges behind the prefix
        calib = np.stack([rng_tokens(16, 320, seed=s) for s in (7, 8)])
        probe = dataclasses.replace(q.layers[0].recipe, sites=())
        for b in q.layers:
            b.recipe = probe
        ranges = capture_token_ranges(q, calib, prefix, progress=False)
        for b in q.layers:
            b.recipe = recipe.replace(merged=True)
        for i, b in enumerate(q.layers):
            init_qparams(b, recipe, {s: _site_range(ranges[s][0][i], ranges[s][1][i], recipe.spec(s)) for s in static_sites(recipe)})
    name = "flatquant-w4a4kv4-static-prefix" if static else "flatquant-w4a4kv4"
    return QuantizedModel(config=ck.config, model=q, fp_model=fp, prefix_kv=prefix, preset=get_preset(name), report={})


def fake_logits(qm, toks):
    c = Compiled(qm.model)
    P = 0 if qm.prefix_kv is None else qm.prefix_kv.length
    out, _ = c.logits(c.state, jnp.asarray(toks), c.cache(toks.shape[0], P + toks.shape[1], qm.prefix_kv), P)
    return np.asarray(out)


@pytest.mark.parametrize("static,param", [(False, "inverse"), pytest.param(False, "orthogonal", marks=pytest.mark.slow),
                                          (True, "inverse")],
                         ids=["dynamic-inverse", "dynamic-orthogonal", "static-prefix"])
def test_flat_real_matches_fake(ck, static, param):
    qm = flat_qm(ck, static=static, param=param)
    pm = pack(qm, backend="xla")
    assert pm.spec.flat and pm.spec.kv_original_space == static and not (pm.spec.r3 or pm.spec.r4)
    toks = np.stack([rng_tokens(12, 320, seed=s) for s in (1, 2)])
    fake = fake_logits(qm, toks)
    real, _ = prefill(pm, jnp.asarray(toks))
    close(real, fake)
    fp = fake_logits(dataclasses.replace(qm, model=qm.fp_model), toks)  # quantization is on
    assert np.abs(fp - fake).max() > 1e3 * 1e-5 * (1 + np.abs(fake).max())


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static-prefix"])
def test_flat_prefill_then_decode_and_kernels(ck, static):
    qm = flat_qm(ck, static=static, seed=3)
    toks = jnp.asarray(rng_tokens(10, 320, seed=4)[None])
    res = {}
    for backend in ("xla", "kernels"):  # kernels: Pallas (interpret mode on CPU) for the GEMMs
        pm = pack(qm, backend=backend)
        full, _ = prefill(pm, toks)
        part, cache = prefill(pm, toks[:, :8], rows=10)
        outs = [np.asarray(part)]
        for i in (8, 9):
            step, cache = decode_step(pm, toks[:, i:i + 1], cache, pm.spec.prefix_len + i)
            outs.append(np.asarray(step))
        close(np.concatenate(outs, axis=1), full)
        res[backend] = np.asarray(full)
    close(res["kernels"], res["xla"])


def test_unmerged_flatquant_refused(ck):
    q = flat_model(ck, FlatQuantRecipe(sites=QSITES, weight=W4))
    qm = QuantizedModel(config=ck.config, model=q, fp_model=None, prefix_kv=None,
                        preset=get_preset("flatquant-w4a4kv4"), report={})
    with pytest.raises(UserError, match="not merged"):
        pack(qm)


def test_flat_saved_model_packs_the_same(ck, tmp_path):
    import prefixquant_jax as pq

    qm = flat_qm(ck, static=False, seed=5)
    qm.report.update(prefix_ids=[], prefix_text=[])
    loaded = pq.load(pq.save(qm, str(tmp_path / "flat"), tokenizer=ck.tokenizer()))
    toks = jnp.asarray(rng_tokens(12, 320, seed=6)[None])
    np.testing.assert_array_equal(np.asarray(prefill(pack(loaded, backend="xla"), toks)[0]),
                                  np.asarray(prefill(pack(qm, backend="xla"), toks)[0]))


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static-prefix"])
def test_flat_int_matmul_fake_equals_real_exactly(ck, static):
    """FlatQuantRecipe(int_matmul=True) on the merged model: the XLA runtime's logits bit for bit."""
    from flax import nnx

    from prefixquant_jax.model import with_recipe

    qm = flat_qm(ck, static=static, seed=7)
    model = with_recipe(nnx.clone(qm.model), qm.model.layers[0].recipe.replace(int_matmul=True))
    toks = np.stack([rng_tokens(12, 320, seed=s) for s in (1, 2)])
    real, _ = prefill(pack(qm, backend="xla"), jnp.asarray(toks))
    np.testing.assert_array_equal(fake_logits(dataclasses.replace(qm, model=model), toks), np.asarray(real))
