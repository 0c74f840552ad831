"""The flat public API (`import prefixquant_jax as pq`): thin functions over the pipeline's modules.

    qm = pq.quantize(checkpoint, calib_tokens, "w4a4kv4-static")      # -> QuantizedModel
    logits = jax.jit(qm.apply)(qm.split()[1], tokens)                  # pure, behind the FP prefix
    pq.perplexity(qm, windows)["ppl"]; pq.generate(qm, prompt_ids, 20); pm = pq.pack(qm)
    pq.save(qm, "DIR"); qm2 = pq.load("DIR")
"""
from __future__ import annotations

import dataclasses

import numpy as np

from prefixquant_jax.errors import UserError


def load_checkpoint(spec):
    """An FP checkpoint: "smollm2" (the bundled GGUF), a .gguf file or an HF directory."""
    from checkpoints_convert import load_checkpoint as _load  # foreign formats: loaded on demand
    return _load(spec)


def quantize(model_or_checkpoint, calib_tokens, preset, *, tokenizer=None, gptq: bool = False, **options):
    """Quantize an FP checkpoint (or its name/path) with `preset` (a name or a Preset), calibrated on
    `calib_tokens` (int [samples, seqlen]); returns a QuantizedModel. `options`: QuantizeOptions fields
    (weight_clip, kv_rule, search, target, eta, seed, grid_samples, progress, ...). FlatQuant presets also
    need `tokenizer` (their training draws its own samples)."""
    from prefixquant_jax.quant.presets import Preset, get_preset
    from prefixquant_jax.pipeline import QuantizeOptions
    from prefixquant_jax.pipeline import quantize as _quantize

    ck = load_checkpoint(model_or_checkpoint) if isinstance(model_or_checkpoint, str) else model_or_checkpoint
    preset = preset if isinstance(preset, Preset) else get_preset(preset)
    names = {f.name for f in dataclasses.fields(QuantizeOptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise UserError(f"unknown quantize option {unknown[0]!r} (one of {', '.join(sorted(names))})")
    opts = QuantizeOptions(gptq=gptq, **{"progress": False, **options})
    return _quantize(ck, tokenizer, preset, opts, calib_tokens=calib_tokens)


def perplexity(qm, windows, batch_size: int = 1, progress: bool = False) -> dict:
    """{"ppl", "windows", ...} of int token windows [N, L] behind the model's prefix (fake-quant model)."""
    from prefixquant_jax.eval.perplexity import perplexity as _ppl
    from prefixquant_jax.runner import Compiled
    return _ppl(Compiled(qm.model), np.asarray(windows, np.int32), qm.prefix_kv, batch_size, progress)


def generate(qm, prompt_ids, max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """Greedy continuation token ids of `prompt_ids` behind the model's prefix (fake-quant model)."""
    from prefixquant_jax.eval.generate import greedy
    from prefixquant_jax.runner import Compiled
    return greedy(Compiled(qm.model), prompt_ids, max_new_tokens, eos_id, qm.prefix_kv)


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
