"""Exports to Hugging Face layout (config.json + model.safetensors that transformers loads).

`export_quantized_hf`: the kernels a quantized model's forward multiplies by (the offline parts applied: norm
folding, R1/R2 rotations, FlatQuant's merged transforms and scales; the weights dequantized from their codes).
What is online in our model cannot be expressed in a stock transformers Llama and is listed in config.json under
`prefixquant.online`: R3/R4 Hadamards, FlatQuant's activation-side transforms, activation and KV quantization, the
FP prefix. So the export computes our model's function only when that list is empty.

`export_rotated_hf`: an FP checkpoint with norms folded and R1/R2 fused; it computes the original function (R3/R4
need online Hadamards a stock Llama cannot run, so they are not applied).
"""
from __future__ import annotations

import numpy as np

import checkpoints_convert
from prefixquant_jax.checkpoint.fp import user_errors
from prefixquant_jax.nn.config import ModelConfig
from prefixquant_jax.nn.decoder import LINEAR_MODULES
from prefixquant_jax.rotate.fuse import RotationConfig, rotate_params


def export_hf(params: dict, config: ModelConfig, out_dir: str, overwrite: bool = False, note: dict | None = None) -> str:
    """params (our layout) written to out_dir; `note` goes to config.json under "prefixquant"."""
    hf = config.to_hf_dict()
    if note:
        hf["prefixquant"] = note
    with user_errors():
        return checkpoints_convert.export_hf(params, hf, out_dir, overwrite=overwrite)


def online_parts(qm) -> list[str]:
    """What of `qm`'s forward stays online (not representable in a transformers Llama)."""
    recipe, parts = qm.recipe, []
    if recipe.rotate:
        parts += ["R3 Hadamard on Q and K after RoPE", "R4 Hadamard before down_proj"]
    if len(qm.model.layers[0].transforms):
        parts.append("FlatQuant activation-side Kronecker transforms")
    if recipe.sites:
        parts.append("activation / KV quantizers: " + ", ".join(s for s, _ in recipe.sites))
    if qm.prefix_len:
        parts.append(f"FP prefix KV of tokens {list(qm.prefix_kv.prefix_ids)}")
    return parts


def export_quantized_hf(qm, out_dir: str, overwrite: bool = False) -> tuple[str, list[str]]:
    """(out_dir, the online parts) of a QuantizedModel exported with the kernels its forward uses."""
    params = qm.model.params_dict()
    for i, blk in enumerate(qm.model.layers):
        for name, group in LINEAR_MODULES.items():
            kernel = blk.recipe.apply_weight(name, blk.linear_module(name).kernel[...], blk.qparams, block=blk)
            params["layers"][i][group][name] = np.asarray(kernel, np.float32)
    online = online_parts(qm)
    note = {"source": "quantized checkpoint", "recipe": qm.recipe.name, "weights": "dequantized from int codes",
            "online": online}
    return export_hf(params, qm.config, out_dir, overwrite=overwrite, note=note), online


def export_rotated_hf(params: dict, config: ModelConfig, out_dir: str, seed: int = 0, overwrite: bool = False) -> str:
    """Fold norms and fuse R1/R2 (the offline rotations), then export as a plain HF model (module docstring)."""
    rparams, rconfig = rotate_params(params, config, RotationConfig(r1=True, r2=True, r3=False, r4=False, seed=seed))
    note = {"rotation": "norms folded, R1 and R2 random Hadamard fused", "seed": seed,
            "online_not_representable": ["R3 (Q/K after RoPE)", "R4 (down_proj input)"]}
    return export_hf(rparams, rconfig, out_dir, overwrite=overwrite, note=note)
