"""Quantizers: specs, the one QArray encoder, fake-quant ops, recipes, clip searches, GPTQ."""
