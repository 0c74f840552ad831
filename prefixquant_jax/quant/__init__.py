"""Quantizers: specs (how to quantize), pure fake-quant ops, named presets."""
from prefixquant_jax.quant.spec import QuantSpec
from prefixquant_jax.quant.qarray import QArray, dequantize, dynamic_qparams, fake_quant, quantize, quantize_int, ste_round

__all__ = ["QArray", "QuantSpec", "dequantize", "dynamic_qparams", "fake_quant", "quantize", "quantize_int", "ste_round"]
