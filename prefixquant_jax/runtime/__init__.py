"""Real int4 inference: the quantized Decoder over packed integer codes (pack.py), its sites and linears on the
integer kernels (recipe.py, gemm.py, kernel_choice.py) and its integer KV cache (cache.py)."""
