"""Real int4 inference: pack a fake-quantized model into integer tensors and run it with integer GEMMs.

pack.py (PackedModel, pack), model.py (prefill, decode_step, forward), compiled.py (RealCompiled, the
Compiled-compatible adapter used by `prefixquant eval/generate --backend real`).
"""
from prefixquant_jax.runtime.model import (
    QuantKVCache,
    decode_step,
    empty_cache,
    forward,
    prefill,
)
from prefixquant_jax.runtime.pack import (
    PackedModel,
    RuntimeSpec,
    default_backend,
    pack,
)
from prefixquant_jax.runtime.compiled import RealCompiled, compile_loaded

__all__ = ["PackedModel", "QuantKVCache", "RealCompiled", "RuntimeSpec", "compile_loaded", "decode_step",
           "default_backend", "empty_cache", "forward", "pack", "prefill"]
