"""Prefix KV state as safetensors: `layers.{i}.key` / `layers.{i}.value`, each [prefix_len, kv_heads, head_dim] fp32.

Metadata (all strings, as safetensors requires): format, prefix_ids (JSON list of the prefix token ids), text,
positions ("0..P-1"), k_rotated ("true" when K is stored after the online R3 Hadamard), num_layers, kv_heads,
head_dim. Writes are atomic; an existing file is kept unless overwrite=True.

In memory (`save_prefix` / `load_prefix`): k, v are lists with one [prefix_len, kv_heads, head_dim] array per
layer, and meta is {"prefix_ids": list[int], "text": str, "k_rotated": bool}.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from checkpoints_convert.errors import FormatError, cannot_write, describe

FORMAT = "prefixquant-prefix-kv/1"


def save_prefix(path: str, k: list, v: list, meta: dict, overwrite: bool = False) -> str:
    """Write the prefix KV (k[i], v[i]: [P, kv_heads, head_dim] for layer i) with meta's prefix_ids (P of them),
    text and k_rotated. Returns the absolute path."""
    from safetensors.numpy import save_file

    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FormatError(f"{path} already exists (pass --overwrite to replace it)")
    ids = [int(t) for t in meta["prefix_ids"]]
    if not k:
        raise ValueError("a prefix KV needs at least one layer")
    tensors = {}
    for i, (ki, vi) in enumerate(zip(k, v)):
        tensors[f"layers.{i}.key"] = np.ascontiguousarray(np.asarray(ki, np.float32))
        tensors[f"layers.{i}.value"] = np.ascontiguousarray(np.asarray(vi, np.float32))
    k0 = tensors["layers.0.key"]
    if len(k) != len(v) or k0.ndim != 3 or k0.shape[0] != len(ids):
        raise ValueError(f"prefix KV of {len(k)} / {len(v)} layers of {k0.shape} for {len(ids)} prefix ids: expected "
                         "as many k as v arrays, each [prefix_len, kv_heads, head_dim]")
    file_meta = {"format": FORMAT, "prefix_ids": json.dumps(ids), "text": str(meta.get("text", "")),
                 "positions": f"0..{len(ids) - 1}", "k_rotated": "true" if meta.get("k_rotated") else "false",
                 "num_layers": str(len(k)), "kv_heads": str(k0.shape[1]), "head_dim": str(k0.shape[2])}
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(path)}-", dir=os.path.dirname(path))
        os.close(fd)
        save_file(tensors, tmp, metadata=file_meta)
        os.replace(tmp, path)
    except Exception as e:  # a full disk or a read-only target (safetensors raises its own error type)
        raise cannot_write(path, e) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_prefix(path: str, expect: dict | None = None) -> tuple[list, list, dict]:
    """(k, v, meta) of a prefix KV file. expect {num_layers, num_kv_heads, head_dim}: FormatError unless the
    file's KV has that many layers of [prefix_len, num_kv_heads, head_dim]."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FormatError(f"prefix file {path!r} does not exist")
    try:
        with safe_open(path, framework="np") as f:
            file_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise FormatError(f"{path}: cannot read prefix safetensors ({describe(e)})") from None
    if file_meta.get("format") != FORMAT:
        raise FormatError(f"{path}: not a prefix KV file of format {FORMAT} (found {file_meta.get('format')!r})")
    if "prefix_ids" not in file_meta:
        raise FormatError(f"{path}: the metadata names no prefix token ids (prefix_ids)")
    try:
        n = int(file_meta["num_layers"])
        ids = [int(t) for t in json.loads(file_meta["prefix_ids"])]
        if n < 1:
            raise ValueError(f"num_layers={n}")
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{path}: bad prefix metadata ({describe(e)})") from None
    try:
        k = [tensors[f"layers.{i}.key"] for i in range(n)]
        v = [tensors[f"layers.{i}.value"] for i in range(n)]
    except KeyError as e:
        raise FormatError(f"{path}: missing tensor {e.args[0]}") from None
    if expect is not None:
        want = (len(ids), expect["num_kv_heads"], expect["head_dim"])
        if n != expect["num_layers"] or tuple(k[0].shape) != want:
            raise FormatError(f"{path}: prefix KV for {n} layers of {tuple(k[0].shape)} does not fit the model "
                              f"({expect['num_layers']} layers of {want})")
    meta = {"prefix_ids": ids, "text": file_meta.get("text", ""), "k_rotated": file_meta.get("k_rotated") == "true"}
    return k, v, meta
