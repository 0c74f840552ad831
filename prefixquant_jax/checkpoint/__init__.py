"""This project's own saved-model format (`prefixquant-quantized/1`): an Orbax state + JSON metadata.

Foreign formats (HF, GGUF, prefix safetensors) live in the `checkpoints_convert` package, which may
import this one; this package loads them only inside functions.
"""
from prefixquant_jax.checkpoint.saved import (
    check_save_target,
    is_saved_quantized,
    load_quantized,
    load_saved_prefix,
    looks_saved,
    read_metadata,
    save_quantized,
    saved_tokenizer,
)

__all__ = ["check_save_target", "is_saved_quantized", "load_quantized", "load_saved_prefix", "looks_saved",
           "read_metadata", "save_quantized", "saved_tokenizer"]
