"""Quantizers: specs (how to quantize), pure fake-quant ops, named presets."""
from prefixquant_jax.quant.spec import QuantSpec
from prefixquant_jax.quant.ops import fake_quant, dynamic_qparams, quantize_int, ste_round

__all__ = ["QuantSpec", "fake_quant", "dynamic_qparams", "quantize_int", "ste_round"]
