"""Export a saved quantized model (`quantize --save DIR`) to Hugging Face layout.

The kernels written are exactly what the quantized forward multiplies by: the offline parts applied
(norm folding, R1/R2 rotations, FlatQuant's merged transforms and scales) and the weights
dequantized from their int codes (codes × per-channel scale). What is online in our model cannot be
expressed in a stock transformers Llama and is listed in config.json under `prefixquant.online`:
R3/R4 Hadamards, FlatQuant's activation-side Kronecker transforms, activation and KV quantization,
and the FP prefix KV. So the export computes our model's function only when that list is empty.
"""
from __future__ import annotations

import numpy as np

from checkpoints_convert.hf import export_hf
from prefixquant_jax.quant.recipe import LINEAR_MODULES


def online_parts(qm) -> list[str]:
    recipe = qm.model.layers[0].recipe
    parts = []
    if getattr(recipe, "r3", False):
        parts.append("R3 Hadamard on Q and K after RoPE")
    if getattr(recipe, "r4", False):
        parts.append("R4 Hadamard before down_proj")
    if len(qm.model.layers[0].transforms):
        parts.append("FlatQuant activation-side Kronecker transforms")
    if getattr(recipe, "sites", ()):
        parts.append("activation / KV quantizers: " + ", ".join(s for s, _ in recipe.sites))
    if qm.prefix_kv is not None:
        parts.append(f"FP prefix KV of tokens {list(qm.prefix_kv.prefix_ids)}")
    return parts


def export_quantized_hf(qm, out_dir: str, overwrite: bool = False) -> tuple[str, list[str]]:
    params = qm.model.params_dict()
    for i, blk in enumerate(qm.model.layers):
        for name, group in LINEAR_MODULES.items():
            kernel = getattr(getattr(blk, group), name).kernel[...]
            if blk.recipe is not None:
                kernel = blk.recipe.apply_weight(name, kernel, blk.qparams, block=blk)
            params["layers"][i][group][name] = np.asarray(kernel, np.float32)
    online = online_parts(qm)
    extra = {"prefixquant": {"source": "quantized checkpoint", "preset": qm.preset.name,
                             "weights": "dequantized from int codes", "online": online}}
    return export_hf(params, qm.config, out_dir, overwrite=overwrite, extra_config=extra), online
