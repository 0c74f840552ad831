"""Fold the trained FlatQuant transforms into the weights (FlatQuant's reparameterization).

Per block, after a condition-number check of every transform:
  * each linear kernel is replaced by what its weight quantizer saw during training: P^-1 diag(1/s) W
    (v: times P_v per KV head; o: (P_o kron P_v)^-1 W), clamped per output channel by the learned LWC
    factors; the RTN scale of that clamped kernel (per output channel, symmetric) goes to
    qparams["w_<linear>"], so the forward fake-quantizes it exactly as in training;
  * a q/k/v bias (Qwen2) stays, except v's, which is multiplied by P_v per KV head like the v kernel's columns;
  * the per-channel scales move into the model: s_qkv into the input RMSNorm weight, s_ug into the post
    RMSNorm weight, s_down into the up kernel's columns (a positive per-output-channel factor: the same
    integer codes, the scale multiplied by s);
  * the LWC logits and the scales are deleted from `block.transforms`; what stays there is the online
    part: the Kronecker factors (qkv, ug, down), P_o, P_k, P_v and the LAC logits.
The blocks' recipe becomes `recipe.replace(merged=True)` (kernels used as stored, see recipe.py), so the
merged model computes the same function as the trained one (the same integer codes up to rounding ties
of the folded products).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from prefixquant_jax.flatquant.recipe import channel_scale, offline_kernel, quantizable_kernel, transformed_bias
from prefixquant_jax.flatquant.transforms import COND_MAX, check_transforms
from prefixquant_jax.model import QuantParam
from prefixquant_jax.quant.recipe import WEIGHT_NAMES


def merge_block(block, recipe) -> None:
    if block.recipe.merged:
        return
    t = block.transforms
    new = {}
    for name in WEIGHT_NAMES:
        kernel = block.linear_module(name).kernel[...]
        if recipe.weight is None:
            new[name] = offline_kernel(t, name, kernel, recipe.param)
        else:
            new[name] = quantizable_kernel(t, name, kernel, recipe.param)
    if "down_s" in t:
        new["up"] = new["up"] * t["down_s"][...][None, :]
    if block.attn.v.bias is not None:  # Qwen2: v's bias moves with the v kernel's columns (times P_v)
        b = block.attn.v.bias
        b[...] = transformed_bias(t, "v", b[...], recipe.param)
    for name, k in new.items():
        var = block.linear_module(name).kernel
        var[...] = k.astype(var[...].dtype)
        if recipe.weight is not None:
            block.qparams["w_" + name] = QuantParam(channel_scale(k, recipe.weight))
    for norm, key in ((block.input_norm, "qkv_s"), (block.post_norm, "ug_s")):
        if key in t:
            w = norm.weight
            w[...] = (w[...].astype(jnp.float32) * t[key][...]).astype(w[...].dtype)
    for key in [k for k in t if k.endswith("_s") or k.startswith("lwc_")]:
        del t[key]
    block.recipe = recipe.replace(merged=True)


def merge_model(model, cond_max: float = COND_MAX) -> dict:
    """Merge every block of `model` in place (its blocks must carry a FlatQuantRecipe); returns the
    largest condition number per site over the layers. UserError (one line) for a transform that is
    singular or worse conditioned than `cond_max`, before anything is changed."""
    recipe = model.layers[0].recipe
    if recipe.merged:
        raise ValueError("the model is merged already")
    conds = check_transforms(model, recipe.param, cond_max)
    for blk in model.layers:
        merge_block(blk, recipe)
    sites = sorted({s for c in conds.values() for s in c})
    return {s: float(np.max([c[s] for c in conds.values() if s in c])) for s in sites}
