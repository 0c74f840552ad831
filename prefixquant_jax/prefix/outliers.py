"""Outlier-token statistics and the prefix choice (PrefixQuant, Sec. 4).

Per layer and token, m = max|x| at a site's input (down_proj input by default). A token is an
outlier in its sample when m > eta * median(m over that sample's tokens). The prefix is BOS plus
the o most frequent outlier token ids (position 0 excluded: any first token acts as a sink), with
o = ceil(max over layers of the mean number of outliers per sample).
"""
from __future__ import annotations

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from prefixquant_jax.nn.decoder import with_recipe
from prefixquant_jax.quant.recipe import Capture, QuantRecipe, pair_ranges, sown_value


def sown_batches(model, recipe, tokens: np.ndarray, batch_size: int = 4, progress=True, desc="stats"):
    """Run `model` (behind its own FP prefix, if any) with `recipe` (one that sows nnx.Intermediate) over tokens
    [N, L] in batches; yield each batch's sown values as a pure dict {"layers": {i: {name: value}}}. `model` is
    left as it was (the run uses with_recipe)."""
    graphdef, state = nnx.split(with_recipe(model, recipe))

    @jax.jit
    def run(state, toks, cache):
        _, inter = nnx.capture(lambda m: m.hidden(toks, cache), nnx.Intermediate)(nnx.merge(graphdef, state))
        return nnx.to_pure_dict(inter)

    for s in tqdm(range(0, len(tokens), batch_size), desc=desc, disable=not progress, leave=False):
        toks = jnp.asarray(tokens[s:s + batch_size])
        yield run(state, toks, model.init_cache(len(toks), toks.shape[1]))


def capture_token_ranges(model, tokens: np.ndarray, batch_size: int = 4, progress=True, desc="stats"):
    """Per-site per-token (min, max) of every quantization site, for all layers, behind the model's prefix.

    Returns {site: (mins, maxs)} with arrays [layers, N, L] (KV sites: [layers, N, L, KV]).
    The model's recipe runs wrapped in Capture(ranges=True) (rotations apply; quantizers too, if any).
    """
    out = collections.defaultdict(list)
    for inter in sown_batches(model, Capture(model.layers[0].recipe or QuantRecipe(), ranges=True), tokens,
                              batch_size, progress, desc):
        for key in inter["layers"][0]:
            out[key].append(np.stack([np.asarray(sown_value(inter["layers"][i][key])) for i in range(len(model.layers))]))
    return pair_ranges({k: np.concatenate(v, axis=1) for k, v in out.items()})


def token_absmax(ranges, site="down_in"):
    """[layers, N, L] max|x| per token (KV sites: max over heads too)."""
    lo, hi = ranges[site]
    a = np.maximum(np.abs(lo), np.abs(hi))
    return a.max(axis=-1) if a.ndim == 4 else a


def outlier_ratios(absmax: np.ndarray) -> np.ndarray:
    """Ratio of each token's max|x| to the median over its sample's tokens: [layers, N, L]."""
    return absmax / np.maximum(np.median(absmax, axis=-1, keepdims=True), 1e-12)


def choose_prefix(tokens: np.ndarray, ratios: np.ndarray, eta: float, bos_id: int | None, max_extra: int = 8) -> dict:
    """Apply the eta rule; returns the prefix ids and the statistics behind the choice."""
    mask = ratios > eta
    mask[:, :, 0] = False  # position 0 is always a sink; BOS covers it
    per_layer_mean = mask.sum(-1).mean(-1)  # [layers]
    o = min(int(math.ceil(per_layer_mean.max())) if per_layer_mean.size else 0, max_extra)
    any_layer = mask.any(axis=0)  # [N, L]: an outlier in at least one layer
    counts = collections.Counter(int(t) for t in tokens[any_layer])
    extra = [t for t, _ in counts.most_common() if t != bos_id][:o]
    prefix = ([bos_id] if bos_id is not None else []) + extra
    return {"prefix_ids": prefix, "o": o, "eta": eta, "outlier_counts": dict(counts.most_common(20)),
            "mean_outliers_per_layer": per_layer_mean.tolist(),
            "max_ratio_per_layer": ratios[:, :, 1:].max(axis=(1, 2)).tolist()}


def find_prefix(unrotated_model, calib: np.ndarray, eta: float, progress=True) -> tuple[dict, dict]:
    """(the prefix choice of choose_prefix, the per-site token ranges it was made from), measured at the
    down_proj input of the unrotated FP model: a Hadamard rotation spreads a token's massive channel over all
    channels, so on SmolLM2 the max/median ratio drops from 34-81 to 3-12 and no token would pass eta. The tokens
    themselves (their norms) stay outliers after rotation; that is what the prefix fixes. `quantize` and
    `prefixquant analyze` both choose their prefix here."""
    ranges = capture_token_ranges(unrotated_model, calib, progress=progress, desc="outliers")
    ratios = outlier_ratios(token_absmax(ranges, "down_in"))
    return choose_prefix(calib, ratios, eta, unrotated_model.config.bos_token_id), ranges
