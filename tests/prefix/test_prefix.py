"""Prefix KV equivalence and outlier-token detection on a model with a planted outlier token."""
import numpy as np

import prefixquant_jax as pq
from prefixquant_jax.eval.perplexity import perplexity
from prefixquant_jax.nn.decoder import Decoder, with_prefix
from prefixquant_jax.prefix.outliers import capture_token_ranges, choose_prefix, outlier_ratios, token_absmax
from prefixquant_jax.prefix.prefix_kv import compute_prefix_kv
from prefixquant_jax.quant.recipe import QuantRecipe
from prefixquant_jax.rotate.fuse import RotationConfig, rotate_params
from tests.conftest import rng_tokens
from tests.runtime.util import logits_of


def test_prefix_kv_equals_one_pass(tiny_ck):
    ck = tiny_ck
    params, config = rotate_params(ck.params, ck.config, RotationConfig())
    m = Decoder(config, params, recipe=QuantRecipe(rotate=True))
    prefix = [1, 7, 9]
    win = rng_tokens(20, config.vocab_size, seed=4)
    full = logits_of(m, np.concatenate([prefix, win])[None])  # jitted: eager op-by-op dispatch is slower
    pkv = compute_prefix_kv(m, prefix, k_rotated=True)
    assert pkv.k[0].shape == (3, config.num_kv_heads, config.head_dim) and pkv.length == 3 and pkv.k_rotated
    behind = with_prefix(m, pkv)
    assert m.prefix_len == 0 and behind.prefix_len == 3
    got = logits_of(behind, win[None])
    np.testing.assert_allclose(got[0], full[0, 3:], atol=1e-5)
    # perplexity with the prefix scores exactly the window tokens 1..L-1 of the one-pass logits
    res = perplexity(behind, win[None], progress=False)
    logp = np.asarray(full[0, 3:-1]) - np.log(np.exp(np.asarray(full[0, 3:-1], np.float64)).sum(-1, keepdims=True))
    nll = -logp[np.arange(19), win[1:]].mean()
    np.testing.assert_allclose(res["nll"], nll, rtol=1e-5)


def planted_model(tiny_dir, outlier_id=77):
    """Make token `outlier_id` drive one MLP channel of layer 0 to a huge value (a massive activation). The
    checkpoint is loaded anew: its params are changed (the session's tiny_ck stays as it is)."""
    ck = pq.load_checkpoint(tiny_dir)
    p = ck.params
    D = ck.config.hidden_size
    e = np.zeros(D, np.float32)
    e[5] = 1.0
    p["embed"] = p["embed"].copy()
    p["embed"][:, 5] = 0.0
    p["embed"][outlier_id] = 4.0 * e
    lp = p["layers"][0]["mlp"]
    lp["gate"], lp["up"] = lp["gate"].copy(), lp["up"].copy()
    lp["gate"][5, 3], lp["up"][5, 3] = 40.0, 40.0
    return ck, Decoder(ck.config, p)


def test_outlier_detection_finds_planted_token(tiny_dir):
    ck, m = planted_model(tiny_dir)
    rng = np.random.default_rng(0)
    toks = rng.integers(3, ck.config.vocab_size, size=(6, 32)).astype(np.int32)
    toks[toks == 77] = 78
    toks[:, [5, 17]] = 77  # the outlier token appears twice per sample
    ranges = capture_token_ranges(m, toks, progress=False)
    ratios = outlier_ratios(token_absmax(ranges, "down_in"))
    assert ratios[0, :, 5].min() > 64
    choice = choose_prefix(toks, ratios, eta=64, bos_id=1)
    # tokens attending to the planted one may inherit large activations later on; the planted token
    # must still be the most frequent outlier, right after BOS, seen at all 12 of its occurrences
    assert choice["prefix_ids"][:2] == [1, 77]
    assert choice["outlier_counts"][77] == 12
    assert choice["o"] >= 2  # two outliers per sample at layer 0
