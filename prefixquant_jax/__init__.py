"""prefixquant-jax: 4-bit post-training quantization of Llama models with prefixed outlier tokens."""
from prefixquant_jax.config import ModelConfig
from prefixquant_jax.errors import UserError
from prefixquant_jax.kv_cache import KVCache
from prefixquant_jax.model import Llama

__all__ = ["ModelConfig", "UserError", "KVCache", "Llama", "load", "save"]


def load(path: str, dtype=None):
    """Load a quantized model saved by `save` / `prefixquant quantize --save DIR` (a QuantizedModel with
    fp_model None). Its tokenizer: `prefixquant_jax.checkpoint.saved.saved_tokenizer(path)`."""
    from prefixquant_jax.checkpoint.saved import load_quantized  # lazy: orbax is heavy
    return load_quantized(path, dtype=dtype)


def save(model, path: str, overwrite: bool = False, tokenizer=None) -> str:
    """Save a QuantizedModel (from `quantize.quantize` or `load`) to directory `path` atomically.

    Pass the tokenizer to make the directory self-contained (eval/generate --model DIR need it)."""
    from prefixquant_jax.checkpoint.saved import save_quantized
    return save_quantized(model, path, overwrite=overwrite, tokenizer=tokenizer)
