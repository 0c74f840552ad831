"""Foreign checkpoint formats <-> numpy arrays and plain dicts: Hugging Face (safetensors, torch .bin, repo ids
through the local HF cache), GGUF, and prefix KV safetensors files; see `read_checkpoint`.

A leaf package: it imports nothing from prefixquant_jax (prefixquant_jax.checkpoint.fp turns its plain data into
ModelConfig / PrefixKV), and importing it changes no environment variable. Errors are `FormatError` (one line).
"""
from checkpoints_convert.errors import FormatError
from checkpoints_convert.gguf_io import read_gguf, read_gguf_config
from checkpoints_convert.hf import export_hf, load_hf_dir, read_config
from checkpoints_convert.load import BUNDLED, RawCheckpoint, load_tokenizer, read_checkpoint, resolve_model_path

__all__ = ["BUNDLED", "FormatError", "RawCheckpoint", "export_hf", "load_hf_dir", "load_tokenizer", "read_checkpoint",
           "read_config", "read_gguf", "read_gguf_config", "resolve_model_path"]
