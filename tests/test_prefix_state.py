"""The prefix is model state: QuantizedModel.apply with a cache equals apply without one on the same tokens, a
forward without the prefix the scales were calibrated behind raises, and every public path (pq.perplexity,
pq.generate, Compiled(model, prefix_kv)) runs behind it. Modes are values: with_recipe leaves its input as it was."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import prefixquant_jax as pq
from prefixquant_jax.compiled import Compiled
from prefixquant_jax.errors import UserError
from prefixquant_jax.eval.generate import greedy
from prefixquant_jax.eval.perplexity import perplexity
from prefixquant_jax.kv_cache import KVCache, behind_prefix, prefix_len
from prefixquant_jax.model import with_recipe
from tests.conftest import rng_tokens


@pytest.fixture(scope="module")
def qm(tiny_dir):
    ck = pq.load_checkpoint(tiny_dir)
    calib = np.random.default_rng(0).integers(0, ck.config.vocab_size, (2, 16))
    return pq.quantize(ck, calib, "w4a4kv4-static", prefix_ids=(1, 7))


def test_apply_with_a_cache_equals_apply_without_one(qm):
    toks = jnp.asarray(np.stack([rng_tokens(12, 320, seed=s) for s in (1, 2)]))
    state = qm.split()[1]
    full = np.asarray(jax.jit(qm.apply)(state, toks))
    assert qm.prefix_len == 2
    # one call on a cache of exactly P + L rows: the same computation, bit for bit
    cache = qm.init_cache(2, qm.prefix_len + 12)
    assert int(cache.pos) == 2 and cache.max_len == 14
    one, after = jax.jit(qm.apply)(state, toks, cache)
    np.testing.assert_array_equal(np.asarray(one), full)
    assert int(after.pos) == 14
    # prefill 8 then decode one at a time, on a longer cache: equal up to float rounding
    step = jax.jit(qm.apply)
    logits, cache = step(state, toks[:, :8], qm.init_cache(2, 20))
    parts = [np.asarray(logits)]
    for i in range(8, 12):
        logits, cache = step(state, toks[:, i:i + 1], cache)
        parts.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=2e-5, atol=2e-5)
    assert int(cache.pos) == 14


def test_apply_runs_behind_the_prefix(qm):
    toks = jnp.asarray(rng_tokens(10, 320, seed=3)[None])
    got = np.asarray(qm.apply(qm.split()[1], toks))
    kv, offset = behind_prefix(qm.prefix_kv, qm.config, 1, 10)
    assert offset == qm.prefix_len and kv.max_len == 12
    want, _ = qm.model(toks, kv, offset)
    np.testing.assert_array_equal(got, np.asarray(want))
    bare, _ = qm.model(toks, KVCache.empty(qm.config, 1, 10), 0)  # the model without its prefix differs
    assert np.abs(np.asarray(bare) - got).max() > 1e-3


def test_a_forward_without_the_prefix_raises(qm, tmp_path):
    toks = jnp.asarray(rng_tokens(6, 320, seed=4)[None])
    with pytest.raises(UserError, match="2-token FP prefix"):
        qm.model(toks)
    loaded = pq.load(pq.save(qm, str(tmp_path / "q")))
    assert loaded.model.prefix_len == 2
    with pytest.raises(UserError, match="QuantizedModel.apply"):
        loaded.model(toks)
    np.testing.assert_array_equal(np.asarray(loaded.apply(loaded.split()[1], toks)),
                                  np.asarray(qm.apply(qm.split()[1], toks)))
    qm.fp_model(toks)  # the FP model has no prefix to forget


def test_public_paths_run_behind_the_prefix(qm):
    win = np.stack([rng_tokens(12, 320, seed=s) for s in (5, 6)]).astype(np.int32)
    behind = Compiled(qm.model, qm.prefix_kv)
    assert behind.prefix_len == prefix_len(qm.prefix_kv) == 2
    explicit = perplexity(Compiled(qm.model), win, qm.prefix_kv, progress=False)
    assert pq.perplexity(qm, win)["ppl"] == explicit["ppl"] == perplexity(behind, win, progress=False)["ppl"]
    assert pq.perplexity(qm, win)["prefix_len"] == 2
    prompt = [5, 6, 7]
    assert pq.generate(qm, prompt, 5) == greedy(Compiled(qm.model), prompt, 5, prefix_kv=qm.prefix_kv) \
        == greedy(behind, prompt, 5)


def test_with_recipe_returns_a_new_model_and_leaves_its_input(qm):
    recipe = qm.model.layers[0].recipe
    fp_view = with_recipe(qm.model, None)
    assert all(b.recipe == recipe for b in qm.model.layers)  # not mutated
    assert all(b.recipe is None for b in fp_view.layers)
    assert fp_view.layers[0].attn.q.kernel is qm.model.layers[0].attn.q.kernel  # the weights are shared
    assert fp_view.prefix_len == qm.model.prefix_len
    toks = jnp.asarray(rng_tokens(8, 320, seed=7)[None])
    kv, off = behind_prefix(qm.prefix_kv, qm.config, 1, 8)
    np.testing.assert_array_equal(np.asarray(fp_view(toks, kv, off)[0]),
                                  np.asarray(with_recipe(qm.fp_model, None)(toks, kv, off)[0]))
    one = with_recipe(qm.model.layers[1], recipe.replace(sites=()))
    assert one.recipe.sites == () and qm.model.layers[1].recipe == recipe


def test_capture_is_a_wrapper_recipe(qm):
    """Capture(recipe, ranges=True) sows each site's input and computes what the recipe computes; the model's
    own recipe is untouched (capture_token_ranges runs with_recipe)."""
    from prefixquant_jax.prefix.outliers import capture_token_ranges
    from prefixquant_jax.quant.recipe import Capture

    recipe = qm.model.layers[0].recipe
    wrapped = with_recipe(qm.model, Capture(recipe, ranges=True))
    assert wrapped.layers[0].recipe.weight == recipe.weight and wrapped.layers[0].recipe.spec("k_cache") == recipe.spec("k_cache")
    toks = jnp.asarray(rng_tokens(8, 320, seed=8)[None])
    kv, off = behind_prefix(qm.prefix_kv, qm.config, 1, 8)
    (logits, _), sown = nnx.capture(lambda m: m(toks, kv, off), nnx.Intermediate)(wrapped)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(qm.model(toks, kv, off)[0]))
    assert "down_in_max" in nnx.to_pure_dict(sown)["layers"][0]
    ranges = capture_token_ranges(qm.model, np.asarray(toks), qm.prefix_kv, progress=False)
    assert ranges["down_in"][0].shape == (2, 1, 8) and ranges["k_cache"][0].shape == (2, 1, 8, 2)
    assert all(b.recipe == recipe for b in qm.model.layers)


def test_models_saved_with_the_old_capture_fields_still_load(qm, tmp_path):
    import json

    d = pq.save(qm, str(tmp_path / "old"))
    meta_path = tmp_path / "old" / "prefixquant.json"
    meta = json.loads(meta_path.read_text())
    meta["model"]["recipe"].update(capture=False, capture_gram=False, capture_qkv=False)  # as saves before Capture
    meta_path.write_text(json.dumps(meta))
    back = pq.load(d)
    assert back.model.layers[0].recipe == qm.model.layers[0].recipe
    toks = jnp.asarray(rng_tokens(6, 320, seed=9)[None])
    np.testing.assert_array_equal(np.asarray(back.apply(back.split()[1], toks)), np.asarray(qm.apply(qm.split()[1], toks)))
