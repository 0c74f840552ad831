"""Outlier tokens and the FP prefix KV cache."""
