"""Fold the trained FlatQuant transforms into the weights (FlatQuant's reparameterization).

Per block, after a condition-number check of every transform:
  * each linear kernel is replaced by what its weight quantizer saw during training: P^-1 diag(1/s) W
    (v: times P_v per KV head; o: (P_o kron P_v)^-1 W), clamped per output channel by the learned LWC
    factors; the RTN scale of that clamped kernel (per output channel, symmetric) goes to
    qparams[<linear>]["scale"], so the forward fake-quantizes it exactly as in training;
  * a q/k/v bias (Qwen2) stays, except v's, which is multiplied by P_v per KV head like the v kernel's columns;
  * the per-channel scales move into the model: s_qkv into the input RMSNorm weight, s_ug into the post
    RMSNorm weight, s_down into the up kernel's columns (a positive per-output-channel factor: the same
    integer codes, the scale multiplied by s);
  * the LWC logits and the scales leave `block.transforms`; what stays there is the online part: the
    factors of every site and the LAC logits.
The result is a new model (`merge_model`; the trained one is left as it was) whose blocks' recipe is
`recipe.replace(merged=True)` (kernels used as stored, see recipe.py), so the merged model computes the
same function as the trained one (the same integer codes up to rounding ties of the folded products).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefixquant_jax.flatquant.recipe import channel_scale, offline_kernel, quantizable_kernel, transformed_bias
from prefixquant_jax.flatquant.transforms import COND_MAX, KRON_SITES, check_transforms
from prefixquant_jax.nn.decoder import WEIGHT_NAMES, with_recipe


def _merge_block(block, recipe) -> None:
    """Fold the transforms of `block` (a new module of `merge_model`'s result, already with the merged recipe)
    into its weights. Every changed value is a new Variable, so the model it was made from keeps its own."""
    t = block.transforms
    new = {}
    for name in WEIGHT_NAMES:
        kernel = block.linear_module(name).kernel[...]
        if recipe.weight is None:
            new[name] = offline_kernel(t, name, kernel, recipe.param)
        else:
            new[name] = quantizable_kernel(t, name, kernel, recipe.param)
    if "down_in" in t and "smooth" in t["down_in"]:
        new["up"] = new["up"] * t["down_in"]["smooth"][...][None, :]
    if block.attn.v.bias is not None:  # Qwen2: v's bias moves with the v kernel's columns (times P_v)
        b = block.attn.v.bias[...]
        block.attn.v.bias = nnx.Param(transformed_bias(t, "v", b, recipe.param).astype(b.dtype))
    for name, k in new.items():
        mod = block.linear_module(name)
        mod.kernel = nnx.Param(k.astype(mod.kernel[...].dtype))
        if recipe.weight is not None:
            block.set_quantizer(name, channel_scale(k, recipe.weight))
    for norm, site in ((block.input_norm, "qkv_in"), (block.post_norm, "up_gate_in")):
        if site in t and "smooth" in t[site]:
            w = norm.weight[...]
            norm.weight = nnx.Param((w.astype(jnp.float32) * t[site]["smooth"][...]).astype(w.dtype))
    # the offline part leaves the transforms: a new dict per site, so the trained model keeps its own
    kept = nnx.Dict()
    for where in list(t):
        if where in WEIGHT_NAMES:  # LWC logits
            continue
        entry = nnx.Dict()
        for key in t[where]:
            if not (where in KRON_SITES and key == "smooth"):
                entry[key] = t[where][key]
        kept[where] = entry
    block.transforms = kept


def merge_model(model, cond_max: float = COND_MAX):
    """(merged model, the largest condition number per site over the layers): a new model (nn.decoder.with_recipe
    with `recipe.replace(merged=True)`) whose blocks hold the folded weights; `model` (its blocks must carry a
    FlatQuantRecipe) is left as it was and shares with the result every variable the merge does not change.
    UserError (one line) for a transform that is singular or worse conditioned than `cond_max`."""
    recipe = model.layers[0].recipe
    if recipe.merged:
        raise ValueError("the model is merged already")
    conds = check_transforms(model, recipe.param, cond_max)
    merged = with_recipe(model, recipe.replace(merged=True))
    for blk in merged.layers:
        _merge_block(blk, recipe)
    sites = sorted({s for c in conds.values() for s in c})
    return merged, {s: float(np.max([c[s] for c in conds.values() if s in c])) for s in sites}
