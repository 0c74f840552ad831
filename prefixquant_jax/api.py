"""The flat public API (`import prefixquant_jax as pq`): thin functions over the pipeline's modules.

    qm = pq.quantize(checkpoint, calib_tokens, "w4a4kv4-static")      # -> QuantizedModel
    qm = pq.quantize(checkpoint, calib_tokens, "w4a4kv4-static", train=pq.TrainConfig(samples=N, seqlen=L))
    qm = pq.quantize(checkpoint, calib_tokens, pq.QuantRecipe(sites=..., weight=pq.QuantSpec(...), r3=True, r4=True))
    logits = jax.jit(qm.apply)(qm.split()[1], tokens)                  # pure, behind the FP prefix
    pq.perplexity(qm, windows)["ppl"]; pq.generate(qm, prompt_ids, 20); pm = pq.pack(qm)
    pq.save(qm, "DIR"); qm2 = pq.load("DIR")
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from prefixquant_jax.errors import UserError

_DRAWN = {"calib_data", "calib_samples", "calib_seqlen"}  # QuantizeOptions fields for drawing samples from text


def load_checkpoint(spec):
    """An FP checkpoint: "smollm2" (the bundled GGUF), a .gguf file or an HF directory."""
    from checkpoints_convert import load_checkpoint as _load  # foreign formats: loaded on demand
    return _load(spec)


def quantize(model_or_checkpoint, calib_tokens, preset_or_recipe, *, prefix: bool | None = None, train=None,
             train_tokens=None, gptq: bool | None = None, checkpoint=None, flatquant=None, options=None, tokenizer=None,
             mesh=None, **fields):
    """The whole job: rotate -> prefix -> weights (-> GPTQ) -> calibrate (-> block-wise training) (-> FlatQuant
    merge) of an FP checkpoint (or its name/path), calibrated on `calib_tokens` (int [samples, seqlen]).
    Returns a QuantizedModel.

    preset_or_recipe: a preset name (PRESETS), a Preset, or a raw quant.recipe.QuantRecipe: your own quantizers
      per site, run through PrefixQuant's pipeline exactly as given (Preset.from_recipe: its r3 = r4 says whether
      the model is rotated, R1-R4 together; static activation sites per tensor, static KV per tensor or head,
      weights static symmetric per channel; anything else raises UserError).
    prefix: with a raw recipe, whether the FP prefix goes in front (default True); a preset decides its own.
    train: a TrainConfig: fine-tune block by block after calibration on `train_tokens` (int [train.samples,
      train.seqlen]; default calib_tokens). FlatQuant presets always train (train None: the `fast` preset
      sized to the tokens).
    checkpoint: a TrainCheckpoint(dir=..., resume=..., overwrite=...): the training run saved as it goes,
      resumable after a kill (a resume skips calibration when the run saved its calibrated scales).
    gptq: GPTQ weights instead of RTN (tuned by the options gptq_damp, gptq_act_order).
    flatquant: a FlatOptions (FlatQuant presets).
    options: a QuantizeOptions; `fields` set its fields (eta, seed, outlier_samples, grid_samples, prefix_ids,
      prefix_kv, weight_clip, kv_rule, search, target, gptq_damp, gptq_act_order, progress); without
      `options` the progress bars are off.
    tokenizer: optional, only to show the prefix tokens as text in the report.
    mesh: a sharding.MeshSpec (e.g. MeshSpec(data=2, model=2)) that calibration and training run their blocks on;
      None: calibration on one device, training's batches over all jax.devices() (`prefixquant quantize --mesh`).
    Bad options or inputs raise UserError (a ValueError) with a one-line message."""
    from prefixquant_jax.options import QuantizeOptions
    from prefixquant_jax.pipeline import quantize as _quantize

    ck = load_checkpoint(model_or_checkpoint) if isinstance(model_or_checkpoint, (str, os.PathLike)) \
        else model_or_checkpoint
    if not (hasattr(ck, "params") and hasattr(ck, "config")):
        raise UserError(f"quantize needs an FP checkpoint or its name/path, got {type(ck).__name__}")
    preset = _preset(preset_or_recipe, prefix)
    names = {f.name for f in dataclasses.fields(QuantizeOptions)} - _DRAWN
    unknown = sorted(set(fields) - names)
    if unknown:
        drawn = unknown[0] in _DRAWN
        raise UserError(f"quantize option {unknown[0]!r} " + ("does not apply: the calibration tokens are given" if drawn
                        else f"is unknown (one of {', '.join(sorted(names))})"))
    if options is not None and not isinstance(options, QuantizeOptions):
        raise UserError(f"options must be a QuantizeOptions, got {type(options).__name__}")
    set_ = {**fields, **({} if gptq is None else {"gptq": bool(gptq)}),
            **({} if flatquant is None else {"flatquant": flatquant})}
    opts = dataclasses.replace(options, **set_) if options is not None else QuantizeOptions(**{"progress": False, **set_})
    if train_tokens is None and (train is not None or preset.method == "flatquant"):
        train_tokens = calib_tokens
    return _quantize(ck, tokenizer, preset, opts, calib_tokens=calib_tokens, train=train, train_tokens=train_tokens,
                     checkpoint=checkpoint, mesh=mesh)


def _preset(preset_or_recipe, prefix):
    """The Preset of quantize's third argument (a name, a Preset or a raw recipe) and its `prefix` keyword."""
    from prefixquant_jax.quant.presets import Preset, get_preset

    if isinstance(preset_or_recipe, (str, Preset)):
        p = preset_or_recipe if isinstance(preset_or_recipe, Preset) else get_preset(preset_or_recipe)
        if prefix is not None:
            raise UserError(f"prefix= applies to a raw QuantRecipe; preset {p.name!r} decides its own "
                            f"(prefix={p.prefix}; another: get_preset(name, prefix=...))")
        return p
    if preset_or_recipe is None or not dataclasses.is_dataclass(preset_or_recipe):
        raise UserError(f"quantize needs a preset name, a Preset or a QuantRecipe, got {type(preset_or_recipe).__name__}")
    return Preset.from_recipe(preset_or_recipe, prefix=True if prefix is None else prefix)


def perplexity(qm, windows, batch_size: int = 1, progress: bool = False) -> dict:
    """{"ppl", "windows", ...} of int token windows [N, L] behind the model's prefix (fake-quant model)."""
    from prefixquant_jax.eval.perplexity import perplexity as _ppl
    return _ppl(qm.compiled(), np.asarray(windows, np.int32), batch_size=batch_size, progress=progress)


def generate(qm, prompt_ids, max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """Greedy continuation token ids of `prompt_ids` behind the model's prefix (fake-quant model)."""
    from prefixquant_jax.eval.generate import greedy
    return greedy(qm.compiled(), prompt_ids, max_new_tokens, eos_id)


def pack(qm, backend: str | None = None, dtype=None):
    """The real integer model (runtime.PackedModel): int4/int8 QArray weights, for runtime.forward."""
    from prefixquant_jax.runtime.pack import pack as _pack
    return _pack(qm, backend, dtype)


def load(path: str, dtype=None):
    """A QuantizedModel saved by `save` / `prefixquant quantize --save DIR` (fp_model None)."""
    from prefixquant_jax.checkpoint.saved import load_quantized  # lazy: orbax is heavy
    return load_quantized(path, dtype=dtype)


def save(model, path: str, overwrite: bool = False, tokenizer=None) -> str:
    """Save a QuantizedModel to directory `path` atomically (the tokenizer makes it self-contained)."""
    from prefixquant_jax.checkpoint.saved import save_quantized
    return save_quantized(model, path, overwrite=overwrite, tokenizer=tokenizer)
