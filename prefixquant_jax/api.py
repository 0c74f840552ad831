"""The flat public API (`import prefixquant_jax as pq`): thin functions over the pipeline's modules.

    ck = pq.load_checkpoint("smollm2")                                   # or an HF repo id, HF dir, .gguf
    qm = pq.quantize(ck, calib_tokens, "w4a4kv4-static")                 # -> QuantizedModel
    qm = pq.quantize(ck, calib_tokens, "w4a4kv4-static", train=pq.TrainConfig(samples=N, seqlen=L),
                     train_tokens=tokens)
    logits = qm.model(tokens)                                            # behind its FP prefix
    pq.perplexity(qm, windows)["ppl"]; pq.generate(qm, prompt_ids, 20); real = pq.pack(qm)
    pq.save(qm, "DIR"); qm2 = pq.load("DIR")
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from prefixquant_jax.checkpoint.fp import Checkpoint, load_checkpoint
from prefixquant_jax.checkpoint.saved import load_quantized, save_quantized
from prefixquant_jax.errors import UserError
from prefixquant_jax.eval.generate import greedy
from prefixquant_jax.eval.perplexity import perplexity as _perplexity
from prefixquant_jax.options import QuantizeOptions
from prefixquant_jax.pipeline.result import QuantizedModel
from prefixquant_jax.pipeline.stages import quantize as _quantize
from prefixquant_jax.presets import preset
from prefixquant_jax.quant.recipe import QuantRecipe
from prefixquant_jax.runtime.pack import pack as _pack

__all__ = ["generate", "load", "load_checkpoint", "pack", "perplexity", "quantize", "save"]


def quantize(model_or_checkpoint, calib_tokens, recipe, *, train=None, train_tokens=None, checkpoint=None,
             options: QuantizeOptions | None = None, mesh=None, **fields) -> QuantizedModel:
    """The whole job: prefix -> rotate -> weights (-> GPTQ) -> calibrate (-> block-wise training) (-> FlatQuant merge)
    of an FP checkpoint (or its name, path or HF repo id), calibrated on `calib_tokens` (int [samples, seqlen]).

    recipe: a preset name (presets.PRESETS) or a QuantRecipe (your own quantizers per site, `prefix` and `rotate`
      as you set them; QuantRecipe.check says what the pipeline can calibrate).
    train: a TrainConfig: fine-tune block by block after calibration on `train_tokens` (int [train.samples,
      train.seqlen]; default calib_tokens). FlatQuant recipes always train (train None: the `fast` preset sized to
      the tokens).
    checkpoint: a TrainCheckpoint(dir=..., resume=..., overwrite=...): the training run saved as it goes,
      resumable after a kill (a resume skips calibration when the run saved its calibrated scales).
    options: a QuantizeOptions; `fields` set its fields (eta, seed, gptq, gptq_damp, flatquant=FlatOptions(...),
      prefix_ids, prefix_kv, weight_clip, ...); without `options` the progress bars are off.
    mesh: a parallel.sharding.MeshSpec (e.g. MeshSpec(data=2, model=2)) that calibration and training run their
      blocks on; None: calibration on one device, training's batches over all jax.devices().
    Bad options or inputs raise UserError (a ValueError) with a one-line message."""
    ck = load_checkpoint(model_or_checkpoint) if isinstance(model_or_checkpoint, (str, os.PathLike)) \
        else model_or_checkpoint
    if not isinstance(ck, Checkpoint):
        raise UserError(f"quantize needs an FP checkpoint or its name/path, got {type(ck).__name__}")
    if isinstance(recipe, str):
        recipe = preset(recipe)
    elif not isinstance(recipe, QuantRecipe):
        raise UserError(f"quantize needs a preset name or a QuantRecipe, got {type(recipe).__name__}")
    names = {f.name for f in dataclasses.fields(QuantizeOptions)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise UserError(f"quantize option {unknown[0]!r} is unknown (one of {', '.join(sorted(names))})")
    if options is not None and not isinstance(options, QuantizeOptions):
        raise UserError(f"options must be a QuantizeOptions, got {type(options).__name__}")
    opts = dataclasses.replace(options, **fields) if options is not None else QuantizeOptions(**{"progress": False,
                                                                                                   **fields})
    if train_tokens is None and (train is not None or recipe.method == "flatquant"):
        train_tokens = calib_tokens
    return _quantize(ck, calib_tokens, recipe, opts, train=train, train_tokens=train_tokens, checkpoint=checkpoint,
                     mesh=mesh)


def _model(model):
    """The Decoder of a QuantizedModel (or a Decoder itself)."""
    return model.model if isinstance(model, QuantizedModel) else model


def perplexity(model, windows, batch_size: int = 1, progress: bool = False) -> dict:
    """{"ppl", "windows", ...} of int token windows [N, L] behind the model's prefix (a QuantizedModel, or any
    Decoder: FP, fake-quant, or packed by `pack`)."""
    return _perplexity(_model(model), np.asarray(windows, np.int32), batch_size=batch_size, progress=progress)


def generate(model, prompt_ids, max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """Greedy continuation token ids of `prompt_ids` behind the model's prefix."""
    return greedy(_model(model), prompt_ids, max_new_tokens, eos_id)


def pack(qm: QuantizedModel, backend: str | None = None, dtype=None, kernels: str = "auto"):
    """The real integer model: the same Decoder over packed int4/int8 codes and an integer KV cache
    (runtime/pack.py)."""
    return _pack(qm, backend, dtype, kernels=kernels)


def load(path: str, dtype=None) -> QuantizedModel:
    """A QuantizedModel saved by `save` / `prefixquant quantize --save DIR`."""
    return load_quantized(path, dtype=dtype)


def save(qm: QuantizedModel, path: str, overwrite: bool = False, tokenizer=None) -> str:
    """Save a QuantizedModel to directory `path` atomically (the tokenizer makes it self-contained)."""
    return save_quantized(qm, path, overwrite=overwrite, tokenizer=tokenizer)
