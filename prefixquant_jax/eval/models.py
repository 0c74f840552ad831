"""What an evaluation runs: a `--model` spec (bundled name, HF repo id or directory, .gguf file, or a directory
written by `quantize --save`) made into the Decoder to evaluate, in the requested backend:

  fake         the fake-quant model as it was saved (an FP checkpoint: the FP model)
  fake, int    the same with matmul "int": each quantized linear computed as the integer runtime does
  real         the packed integer model (runtime/pack.py), kernels chosen by `kernels`
An imported prefix (`import_prefix`, a file from export-prefix) replaces the model's own; `mesh` puts the model's
state on a device mesh (an FP checkpoint's weights go there straight from the host)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

from checkpoints_convert.lazy import materialize
from prefixquant_jax.checkpoint.fp import load_checkpoint, load_prefix_kv
from prefixquant_jax.checkpoint.saved import load_quantized, looks_saved, saved_tokenizer
from prefixquant_jax.errors import UserError
from prefixquant_jax.nn.decoder import Decoder, with_prefix, with_recipe
from prefixquant_jax.parallel.sharding import place_params, shard
from prefixquant_jax.pipeline.result import QuantizedModel
from prefixquant_jax.runtime.pack import pack

BACKENDS = ("fake", "real")
MATMULS = ("float", "int")


@dataclasses.dataclass
class EvalModel:
    """`model`: the Decoder to run (its prefix inside); `name`: its recipe's name ("fp" for an FP checkpoint);
    `tokenizer()`: loaded on first use (building one from a GGUF file takes seconds); `quantized`: the saved
    QuantizedModel, None for an FP checkpoint; `mesh`: the jax Mesh its state is on (None: one device)."""

    model: Decoder
    name: str
    tokenizer_fn: Callable[[], Any]
    quantized: QuantizedModel | None = None
    mesh: Any = None
    _tokenizer: Any = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self.tokenizer_fn()
        return self._tokenizer


def _imported(path: str, config, rotated: bool, what: str):
    pkv = load_prefix_kv(path, config)
    if pkv.k_rotated != rotated:
        raise UserError(f"{path}: prefix KV computed by a {'rotated' if pkv.k_rotated else 'unrotated'} model does "
                        f"not fit {what} ({'rotated' if rotated else 'unrotated'})")
    return pkv


def load_for_eval(spec: str, dtype=jnp.float32, import_prefix: str | None = None, backend: str = "fake",
                  matmul: str = "float", kernels: str = "auto", mesh=None) -> EvalModel:
    """The EvalModel of `spec` (module docstring); `mesh`: a parallel.sharding.MeshSpec, or None."""
    if backend not in BACKENDS or matmul not in MATMULS:
        raise UserError(f"backend must be one of {', '.join(BACKENDS)} and matmul one of {', '.join(MATMULS)}, got "
                        f"{backend!r}, {matmul!r}")
    if looks_saved(spec):
        qm = load_quantized(spec, dtype)
        if import_prefix:
            pkv = _imported(import_prefix, qm.config, qm.recipe.rotate, f"{spec} ({qm.recipe.name!r})")
            qm = qm.replace(model=with_prefix(qm.model, pkv))
        model = qm.model
        if backend == "real":
            model = pack(qm, dtype=dtype, kernels=kernels)
        elif matmul == "int":
            recipe = model.recipe
            if recipe.weight is None or not (recipe.method == "prefixquant" or recipe.merged):
                raise UserError(f"--fake-matmul int needs a model with quantized weights (FlatQuant: merged); "
                                f"{recipe.name!r} has none")
            model = with_recipe(model, recipe.replace(matmul="int"))
        placed = shard(model, mesh)
        return EvalModel(placed.model, qm.recipe.name, lambda: saved_tokenizer(spec), qm, placed.mesh)
    if backend == "real":
        raise UserError(f"backend 'real' needs a quantized model saved by pq.save; {spec!r} is a full-precision "
                        "checkpoint", "backend 'real'", "pq.save")
    # a bf16 model takes a bf16 checkpoint's tensors as they are (half the host memory; the same values as through
    # float32, which holds bf16 exactly); any other dtype reads float32 params
    ck = load_checkpoint(spec, keep_dtype=jnp.dtype(dtype) == jnp.bfloat16)
    params = ck.params
    if mesh is not None:  # device_put matches the params tree with a tree of shardings: plain dicts
        params = place_params(materialize(params), mesh)
    model = Decoder(ck.config, params, dtype)
    if import_prefix:
        model = with_prefix(model, _imported(import_prefix, ck.config, False, f"the unrotated model {spec!r}"))
    placed = shard(model, mesh)
    return EvalModel(placed.model, "fp", ck.tokenizer, None, placed.mesh)
