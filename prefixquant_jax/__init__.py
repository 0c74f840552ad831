"""prefixquant-jax: 4-bit post-training quantization of Llama models with prefixed outlier tokens."""
from prefixquant_jax.config import ModelConfig
from prefixquant_jax.errors import UserError
from prefixquant_jax.kv_cache import KVCache
from prefixquant_jax.model import Llama

__all__ = ["ModelConfig", "UserError", "KVCache", "Llama"]
