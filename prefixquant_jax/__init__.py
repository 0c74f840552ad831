"""prefixquant-jax: 4-bit post-training quantization of Llama models with prefixed outlier tokens.

`import prefixquant_jax as pq`: load_checkpoint, quantize (with its options QuantizeOptions, TrainConfig,
TrainCheckpoint, FlatOptions), get_preset, QuantSpec, QuantRecipe (your own recipe, for quantize), QArray, the
quantizer variable types (QuantParam and its kinds Scale, ZeroPoint: nnx filters), perplexity, generate, pack,
save, load (README "Use it from Python").
"""
from prefixquant_jax.api import generate, load, load_checkpoint, pack, perplexity, quantize, save
from prefixquant_jax.nn.config import ModelConfig
from prefixquant_jax.errors import UserError
from prefixquant_jax.flatquant.pipeline import FlatOptions
from prefixquant_jax.kv_cache import KVCache
from prefixquant_jax.model import Llama, QuantParam, Scale, ZeroPoint
from prefixquant_jax.options import TRAIN_PRESETS, QuantizeOptions, TrainCheckpoint, TrainConfig, train_config
from prefixquant_jax.quant.presets import PRESETS, Preset, get_preset
from prefixquant_jax.quant.qarray import QArray, dequantize
from prefixquant_jax.quant.recipe import QuantRecipe
from prefixquant_jax.quant.spec import QuantSpec

__all__ = ["FlatOptions", "KVCache", "Llama", "ModelConfig", "PRESETS", "Preset", "QArray", "QuantParam", "QuantRecipe",
           "QuantSpec", "QuantizeOptions", "Scale", "TRAIN_PRESETS", "TrainCheckpoint", "TrainConfig", "UserError",
           "ZeroPoint", "dequantize", "generate", "get_preset", "load", "load_checkpoint", "pack", "perplexity",
           "quantize", "save", "train_config"]
