"""FP checkpoints in foreign formats (HF, GGUF, HF repo ids) and prefix KV files, as this package's types.

checkpoints_convert reads and writes them as plain data (HF config dicts, numpy arrays); here they become a
ModelConfig and a PrefixKV, and its FormatError becomes a UserError (the CLI's one-line `error:`).
"""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

import checkpoints_convert
from checkpoints_convert import FormatError, prefix_io
from prefixquant_jax.errors import UserError
from prefixquant_jax.nn.config import ModelConfig
from prefixquant_jax.nn.cache import PrefixKV


@contextlib.contextmanager
def user_errors():
    """FormatError (the converters' one-line errors) as UserError."""
    try:
        yield
    except FormatError as e:
        raise UserError(str(e)) from None


@dataclasses.dataclass
class Checkpoint:
    """A loaded FP checkpoint: config, params (float32 numpy in the layout of prefixquant_jax/nn/decoder.py;
    load_checkpoint(keep_dtype=True): a safetensors checkpoint's own float dtype) and where it came from. A
    safetensors or GGUF checkpoint's params["layers"] is a checkpoints_convert.lazy.LazyLayers (layers read when
    first asked for; lazy.streamed reads them without keeping them)."""

    config: ModelConfig
    params: dict
    path: str
    kind: str  # "gguf" | "hf"
    name: str

    def tokenizer(self):
        return load_tokenizer(self.path, self.kind)


def load_tokenizer(path: str, kind: str):
    """The tokenizer of a checkpoint (kind "hf": a directory; "gguf": the file's own)."""
    with user_errors():
        return checkpoints_convert.load_tokenizer(path, kind)


def _model_config(hf_config: dict, source: str) -> ModelConfig:
    return ModelConfig.from_hf_dict(hf_config, source=source)


def load_checkpoint(spec: str, keep_dtype: bool = False) -> Checkpoint:
    """The checkpoint `spec` names: a bundled name, a path (.gguf, HF directory) or an HF repo id org/name[@rev].
    keep_dtype: see checkpoints_convert.read_checkpoint. The config is checked before any tensor is read."""
    with user_errors():
        raw = checkpoints_convert.read_checkpoint(spec, keep_dtype=keep_dtype, check_config=_model_config)
    return Checkpoint(_model_config(raw.hf_config, raw.path), raw.params, raw.path, raw.kind, raw.name)


def save_prefix_kv(prefix_kv: PrefixKV, path: str, overwrite: bool = False) -> str:
    """Write `prefix_kv` (k[i], v[i]: [P, kv_heads, head_dim], the file's layout) as a prefix KV safetensors file
    (checkpoints_convert.prefix_io); returns the path."""
    k = [np.asarray(a, np.float32) for a in prefix_kv.k]
    v = [np.asarray(a, np.float32) for a in prefix_kv.v]
    meta = {"prefix_ids": prefix_kv.prefix_ids, "text": prefix_kv.text, "k_rotated": prefix_kv.k_rotated}
    with user_errors():
        return prefix_io.save_prefix(path, k, v, meta, overwrite=overwrite)


def load_prefix_kv(path: str, config: ModelConfig | None = None) -> PrefixKV:
    """Read a prefix KV file; with `config`, check it fits the model (layers, kv heads, head_dim)."""
    expect = None if config is None else {"num_layers": config.num_layers, "num_kv_heads": config.num_kv_heads,
                                          "head_dim": config.head_dim}
    with user_errors():
        k, v, meta = prefix_io.load_prefix(path, expect)
    return PrefixKV(k, v, prefix_ids=meta["prefix_ids"], text=meta["text"], k_rotated=meta["k_rotated"])
