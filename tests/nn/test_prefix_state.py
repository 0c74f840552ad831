"""The FP prefix is model state (nn/decoder.py): `model(tokens)` runs behind it, at positions P..; `model(tokens,
cache)` on a cache from `init_cache` (rows for the tokens after the prefix, pos starting at P) gives the same
numbers, one prefill or prefill-then-decode; every public path (pq.perplexity, pq.generate, save/load) runs behind
it. Models are values: with_recipe / with_prefix return new models and leave their input as it was.

Tolerances: the same computation compares bit for bit (jitted: eval.forward.logits); prefill then one-token decode
steps, float32 rounding only: rtol = atol = 2e-5; the FP model behind its prefix vs one pass over prefix + tokens:
atol 1e-5.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import prefixquant_jax as pq
from prefixquant_jax.eval.generate import greedy
from prefixquant_jax.eval.perplexity import perplexity
from prefixquant_jax.nn.cache import Cache, LayerKV, PrefixKV
from prefixquant_jax.nn.decoder import Decoder, with_prefix, with_recipe
from tests.conftest import rng_tokens
from tests.runtime.util import logits_of, forward


@pytest.fixture(scope="module")
def qm(tiny_quantized):
    """w4a4kv4-static behind the FP prefix [1] (shared: never changed in place)."""
    return tiny_quantized("w4a4kv4-static")


def test_init_cache_positions(qm):
    m = qm.model
    assert m.prefix_len == 1 and m.prefix_kv.prefix_ids == (1,)
    cache = m.init_cache(2, 12)
    assert isinstance(cache, Cache) and int(cache.pos) == 1 and cache.rows == 12  # rows after the prefix only
    assert len(cache.kv) == m.config.num_layers and isinstance(cache.kv[0], LayerKV)
    assert cache.kv[0].k.shape == (2, 12, m.config.num_kv_heads, m.config.head_dim)
    bare = with_prefix(m, None)
    assert bare.prefix_len == 0 and bare.prefix_kv is None and int(bare.init_cache(1, 4).pos) == 0
    assert bare.layers[0].prefix_k is None
    assert m.layers[0].prefix_k.shape == (1, m.config.num_kv_heads, m.config.head_dim)


def test_call_with_a_cache_equals_call_without_one(qm):
    toks = np.stack([rng_tokens(12, 320, seed=s) for s in (1, 2)])
    model = qm.model
    full = logits_of(model, toks)  # model(toks): a fresh cache of 12 rows inside
    graphdef, state = nnx.split(model)
    direct = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(toks)))
    np.testing.assert_array_equal(direct, full)
    # one call on a cache of exactly L rows: the same computation, bit for bit
    cache = model.init_cache(2, 12)
    assert int(cache.pos) == 1 and cache.rows == 12
    one, after = forward(model, toks, cache)
    np.testing.assert_array_equal(one, full)
    assert int(after.pos) == 13
    # prefill 8 then decode one at a time, on a longer cache: equal up to float rounding
    logits, cache = forward(model, toks[:, :8], rows=20)
    parts = [logits]
    for i in range(8, 12):
        logits, cache = forward(model, toks[:, i:i + 1], cache)
        parts.append(logits)
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=2e-5, atol=2e-5)
    assert int(cache.pos) == 13


def test_model_runs_behind_the_prefix(qm):
    """The prefix rows are what the FP model computes for the prefix tokens at 0..P-1, the tokens sit at P..: the
    FP model behind its prefix equals one pass over prefix + tokens; the quantized model without it differs."""
    toks = rng_tokens(10, 320, seed=3)[None]
    got = logits_of(qm.model, toks)
    fp = with_recipe(qm.model, qm.recipe.fp_reference())  # the rotated FP model (R3/R4 online), same prefix
    assert qm.prefix_kv.k_rotated and fp.prefix_kv.k[0] is not None
    ids = np.concatenate([np.asarray(qm.prefix_kv.prefix_ids)[None], toks], axis=1)
    one_pass = logits_of(with_prefix(fp, None), ids)[:, qm.prefix_len:]
    np.testing.assert_allclose(logits_of(fp, toks), one_pass, atol=1e-5)
    # with_prefix of the model's own prefix data: the same model
    np.testing.assert_array_equal(logits_of(with_prefix(with_prefix(qm.model, None), qm.prefix_kv), toks), got)
    bare = logits_of(with_prefix(qm.model, None), toks)  # the model without its prefix differs
    assert np.abs(bare - got).max() > 1e-3


def test_saved_model_keeps_its_prefix(qm, tmp_path):
    toks = rng_tokens(6, 320, seed=4)[None]
    loaded = pq.load(pq.save(qm, str(tmp_path / "q")))
    assert loaded.model.prefix_len == 1 and loaded.prefix_kv.prefix_ids == qm.prefix_kv.prefix_ids
    np.testing.assert_array_equal(logits_of(loaded.model, toks), logits_of(qm.model, toks))


def test_public_paths_run_behind_the_prefix(qm):
    win = np.stack([rng_tokens(12, 320, seed=s) for s in (5, 6)]).astype(np.int32)
    res = pq.perplexity(qm, win)
    assert res["prefix_len"] == 1
    assert res["ppl"] == perplexity(qm.model, win, progress=False)["ppl"]
    # reference: the mean NLL of tokens 1..L-1 from the model's logits (behind its prefix)
    logits = logits_of(qm.model, win).astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], win[:, 1:, None], axis=-1).mean()
    np.testing.assert_allclose(res["nll"], nll, rtol=1e-5)
    prompt = [5, 6, 7]
    out = pq.generate(qm, prompt, 5)
    assert out == greedy(qm.model, prompt, 5) and len(out) == 5
    # reference: each generated token is the argmax of one full forward behind the prefix over what precedes it
    full = logits_of(qm.model, np.asarray(prompt + out[:-1])[None])[0]
    assert [int(t) for t in np.argmax(full[len(prompt) - 1:], axis=-1)] == out


def test_with_recipe_returns_a_new_model_and_leaves_its_input(qm):
    recipe = qm.model.layers[0].recipe
    fp_view = with_recipe(qm.model, None)
    assert all(b.recipe == recipe for b in qm.model.layers)  # not mutated
    assert all(b.recipe is None for b in fp_view.layers)
    assert fp_view.layers[0].attn.q.kernel is qm.model.layers[0].attn.q.kernel  # the weights are shared
    assert fp_view.layers[0].prefix_k is qm.model.layers[0].prefix_k and fp_view.prefix_len == qm.model.prefix_len
    toks = rng_tokens(8, 320, seed=7)[None]
    plain = Decoder(qm.config, qm.model.params_dict(), prefix=qm.prefix_kv)  # the same arrays, no recipe
    np.testing.assert_array_equal(logits_of(fp_view, toks), logits_of(plain, toks))
    one = with_recipe(qm.model.layers[1], recipe.replace(sites=()))
    assert one.recipe.sites == () and qm.model.layers[1].recipe == recipe


def test_with_prefix_returns_a_new_model_and_leaves_its_input(qm):
    P, KV, hd = 2, qm.config.num_kv_heads, qm.config.head_dim
    rng = np.random.default_rng(0)
    other = PrefixKV(k=[rng.standard_normal((P, KV, hd)).astype(np.float32) for _ in qm.model.layers],
                     v=[rng.standard_normal((P, KV, hd)).astype(np.float32) for _ in qm.model.layers],
                     prefix_ids=(1, 7), text="x")
    new = with_prefix(qm.model, other)
    assert new.prefix_len == 2 and int(new.init_cache(1, 3).pos) == 2 and new.prefix_kv.text == "x"
    np.testing.assert_array_equal(new.prefix_kv.k[1], other.k[1])
    assert qm.model.prefix_len == 1 and qm.model.prefix_kv.prefix_ids == (1,)  # not mutated
    assert new.layers[0].attn.q.kernel is qm.model.layers[0].attn.q.kernel and new.recipe == qm.recipe


def test_capture_is_a_wrapper_recipe(qm):
    """Capture(recipe, ranges=True) sows each site's input and computes what the recipe computes; the model's
    own recipe is untouched (capture_token_ranges runs with_recipe)."""
    from prefixquant_jax.prefix.outliers import capture_token_ranges
    from prefixquant_jax.quant.recipe import Capture

    recipe = qm.model.layers[0].recipe
    wrapped = with_recipe(qm.model, Capture(recipe, ranges=True))
    inner = wrapped.layers[0].recipe
    assert inner.weight == recipe.weight and inner.spec("k_cache") == recipe.spec("k_cache")
    toks = jnp.asarray(rng_tokens(8, 320, seed=8)[None])
    run = nnx.jit(lambda m, t: nnx.capture(lambda m: m(t), nnx.Intermediate)(m))
    logits, sown = run(wrapped, toks)
    np.testing.assert_array_equal(np.asarray(logits), logits_of(qm.model, toks))
    assert "down_in_max" in nnx.to_pure_dict(sown)["layers"][0]
    ranges = capture_token_ranges(qm.model, np.asarray(toks), progress=False)
    assert ranges["down_in"][0].shape == (2, 1, 8) and ranges["k_cache"][0].shape == (2, 1, 8, 2)
    assert all(b.recipe == recipe for b in qm.model.layers)
