"""prefixquant-jax: 4-bit post-training quantization of Llama-family models with prefixed outlier tokens.

`import prefixquant_jax as pq` (README "Use it from Python"):
  load_checkpoint, quantize, perplexity, generate, pack, save, load    the job (api.py)
  QuantizeOptions, FlatOptions, TrainConfig, TrainCheckpoint, train_config    its options (options.py)
  PRESETS, preset, QuantRecipe, QuantSpec                             what to quantize (presets.py, quant/)
  QArray, dequantize                                                  the one quantized-array type
  Decoder, Cache, PrefixKV, ModelConfig                               the model (nn/)
  QuantParam, Scale, ZeroPoint                                        quantizer variable types (nnx filters)
  QuantizedModel, UserError
"""
from prefixquant_jax.api import generate, load, load_checkpoint, pack, perplexity, quantize, save
from prefixquant_jax.errors import UserError
from prefixquant_jax.nn.cache import Cache, PrefixKV
from prefixquant_jax.nn.config import ModelConfig
from prefixquant_jax.nn.decoder import Decoder
from prefixquant_jax.nn.variables import QuantParam, Scale, ZeroPoint
from prefixquant_jax.options import (TRAIN_PRESETS, FlatOptions, QuantizeOptions, TrainCheckpoint, TrainConfig,
                                     train_config)
from prefixquant_jax.pipeline.result import QuantizedModel
from prefixquant_jax.presets import PRESETS, preset
from prefixquant_jax.quant.qarray import QArray, dequantize
from prefixquant_jax.quant.recipe import QuantRecipe
from prefixquant_jax.quant.spec import QuantSpec

__all__ = ["Cache", "Decoder", "FlatOptions", "ModelConfig", "PRESETS", "PrefixKV", "QArray", "QuantParam",
           "QuantRecipe", "QuantSpec", "QuantizeOptions", "QuantizedModel", "Scale", "TRAIN_PRESETS", "TrainCheckpoint",
           "TrainConfig", "UserError", "ZeroPoint", "dequantize", "generate", "load", "load_checkpoint", "pack",
           "perplexity", "preset", "quantize", "save", "train_config"]
