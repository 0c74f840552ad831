"""Glue from a `--model` spec to a ready-to-run model (FP checkpoint or saved quantized model)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from prefixquant_jax.compiled import Compiled


@dataclasses.dataclass
class Loaded:
    config: Any
    compiled: Compiled  # behind `prefix_kv` (Compiled(model, prefix_kv))
    tokenizer_fn: Any  # loaded on first use: building a tokenizer from GGUF takes seconds
    prefix_kv: Any = None
    preset: str = "fp"
    meta: dict = dataclasses.field(default_factory=dict)
    _tokenizer: Any = None
    quantized: Any = None  # the QuantizedModel of a saved quantized checkpoint (runtime.pack input); None for FP

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self.tokenizer_fn()
        return self._tokenizer


def load_fp(model_spec: str, dtype=jnp.float32, mesh=None):
    """(Checkpoint, Llama) for an FP checkpoint spec; with `mesh` (a sharding.MeshSpec) the Llama's weights are
    put on that mesh straight from the host (sharding.place_params); ck.params stay host numpy."""
    from checkpoints_convert import load_checkpoint
    from prefixquant_jax.model import Llama

    # a bf16 model takes a bf16 checkpoint's tensors as they are (half the host memory; the same values as
    # through float32, which holds bf16 exactly); any other dtype reads float32 params
    ck = load_checkpoint(model_spec, keep_dtype=jnp.dtype(dtype) == jnp.bfloat16)
    params = ck.params
    if mesh is not None:  # device_put matches the params tree with a tree of shardings: plain dicts
        from checkpoints_convert.lazy import materialize
        from prefixquant_jax.sharding import place_params
        params = place_params(materialize(params), mesh)
    return ck, Llama.from_params(ck.config, params, dtype)


def load_for_inference(model_spec: str, dtype=jnp.float32, import_prefix: str | None = None, mesh=None) -> Loaded:
    """mesh: a sharding.MeshSpec to build an FP checkpoint's model on (saved quantized models: not yet, they are
    loaded on one device and moved by sharding.shard)."""
    from prefixquant_jax.checkpoint.saved import looks_saved
    if looks_saved(model_spec):
        return load_saved(model_spec, dtype, import_prefix)
    ck, model = load_fp(model_spec, dtype, mesh)
    prefix_kv = None
    if import_prefix:
        from checkpoints_convert.prefix_io import load_prefix_kv
        prefix_kv = load_prefix_kv(import_prefix, ck.config)
        if prefix_kv.k_rotated:
            from prefixquant_jax.errors import UserError
            raise UserError(f"{import_prefix}: this prefix KV was computed by a rotated model; it does not fit the unrotated model {model_spec!r}")
    return Loaded(config=ck.config, compiled=Compiled(model, prefix_kv), tokenizer_fn=ck.tokenizer, prefix_kv=prefix_kv)


def load_saved(path: str, dtype=jnp.float32, import_prefix: str | None = None) -> Loaded:
    """A model saved by `quantize --save` (prefixquant_jax.checkpoint.saved), with its prefix KV and tokenizer;
    `import_prefix` replaces the saved prefix KV (it must match the model's rotation)."""
    from prefixquant_jax.checkpoint.saved import load_quantized, saved_tokenizer
    from prefixquant_jax.errors import UserError

    qm = load_quantized(path, dtype)
    prefix_kv = qm.prefix_kv
    if import_prefix:
        from checkpoints_convert.prefix_io import load_prefix_kv
        prefix_kv = load_prefix_kv(import_prefix, qm.config)
        if prefix_kv.k_rotated != qm.preset.rotate:
            raise UserError(f"{import_prefix}: prefix KV k_rotated={prefix_kv.k_rotated} does not fit {path} "
                            f"(preset {qm.preset.name!r}, rotated={qm.preset.rotate})")
    return Loaded(config=qm.config, compiled=Compiled(qm.model, prefix_kv), tokenizer_fn=lambda: saved_tokenizer(path),
                  prefix_kv=prefix_kv, preset=qm.preset.name, meta=qm.report, quantized=qm)
