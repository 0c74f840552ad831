"""Prefix KV state as safetensors: `layers.{i}.key` / `layers.{i}.value`, each [prefix_len, kv_heads, head_dim] fp32.

Metadata (all strings, as safetensors requires): format, prefix_ids (JSON list of the prefix token ids),
token_ids (the same list: its old name, for readers written before the rename), text, positions ("0..P-1"),
k_rotated ("true" when K is stored after the online R3 Hadamard), num_layers, kv_heads, head_dim. A file
with only token_ids (written before the rename) loads. Writes are atomic; an existing file is kept unless
overwrite=True.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from prefixquant_jax.errors import UserError, describe
from prefixquant_jax.prefix.prefix_kv import PrefixKV

FORMAT = "prefixquant-prefix-kv/1"


def save_prefix_kv(prefix: PrefixKV, path: str, overwrite: bool = False) -> str:
    from safetensors.numpy import save_file

    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{path} already exists (pass --overwrite to replace it)")
    tensors = {}
    for i, (k, v) in enumerate(zip(prefix.k, prefix.v)):
        tensors[f"layers.{i}.key"] = np.ascontiguousarray(np.asarray(k, np.float32)[0])
        tensors[f"layers.{i}.value"] = np.ascontiguousarray(np.asarray(v, np.float32)[0])
    k0 = tensors["layers.0.key"]
    ids = json.dumps(prefix.prefix_ids)
    meta = {"format": FORMAT, "prefix_ids": ids, "token_ids": ids, "text": prefix.text,
            "positions": f"0..{prefix.length - 1}", "k_rotated": "true" if prefix.k_rotated else "false",
            "num_layers": str(len(prefix.k)), "kv_heads": str(k0.shape[1]), "head_dim": str(k0.shape[2])}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-prefix-", suffix=".safetensors", dir=os.path.dirname(path))
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_prefix_kv(path: str, config=None) -> PrefixKV:
    """Read a prefix KV file; with `config`, check it fits the model (layers, kv heads, head_dim)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise UserError(f"prefix file {path!r} does not exist")
    try:
        with safe_open(path, framework="np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f"{path}: cannot read prefix safetensors ({describe(e)})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a prefix KV file of format {FORMAT} (found {meta.get('format')!r})")
    n = int(meta["num_layers"])
    try:
        k = [tensors[f"layers.{i}.key"][None] for i in range(n)]
        v = [tensors[f"layers.{i}.value"][None] for i in range(n)]
    except KeyError as e:
        raise UserError(f"{path}: missing tensor {e.args[0]}") from None
    if "prefix_ids" not in meta and "token_ids" not in meta:
        raise UserError(f"{path}: the metadata names no prefix token ids (prefix_ids)")
    ids = json.loads(meta.get("prefix_ids", meta.get("token_ids")))
    if config is not None:
        want = (len(ids), config.num_kv_heads, config.head_dim)
        if n != config.num_layers or tuple(k[0].shape[1:]) != want:
            raise UserError(f"{path}: prefix KV for {n} layers of {tuple(k[0].shape[1:])} does not fit the model "
                            f"({config.num_layers} layers of {want})")
    return PrefixKV(k=k, v=v, prefix_ids=ids, text=meta.get("text", ""), k_rotated=meta.get("k_rotated") == "true")
