"""Prefix KV files: export -> import is exact (arrays, ids, text, k_rotated); the on-disk layout; bad files give
one-line errors."""
import json
from dataclasses import replace

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from checkpoints_convert import FormatError
from checkpoints_convert.prefix_io import FORMAT, load_prefix, save_prefix
from prefixquant_jax.checkpoint.fp import load_prefix_kv, save_prefix_kv
from prefixquant_jax.errors import UserError
from prefixquant_jax.checkpoint.fp import load_checkpoint
from prefixquant_jax.nn.config import ModelConfig
from prefixquant_jax.nn.decoder import Decoder
from prefixquant_jax.prefix.prefix_kv import PrefixKV, compute_prefix_kv

CONFIG = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16)


def _kv(layers=2, p=3, kv_heads=2, head_dim=16, seed=0):
    rng = np.random.default_rng(seed)
    return ([rng.standard_normal((p, kv_heads, head_dim)).astype(np.float32) for _ in range(layers)],
            [rng.standard_normal((p, kv_heads, head_dim)).astype(np.float32) for _ in range(layers)])


def test_round_trip_and_file_layout(tmp_path):
    k, v = _kv()
    path = save_prefix(str(tmp_path / "p.safetensors"), k, v, {"prefix_ids": [1, 5, 9], "text": "<s> a b",
                                                                  "k_rotated": True})
    with safe_open(path, framework="np") as f:
        meta = f.metadata()
    assert meta == {"format": FORMAT, "prefix_ids": "[1, 5, 9]", "text": "<s> a b", "positions": "0..2",
                    "k_rotated": "true", "num_layers": "2", "kv_heads": "2", "head_dim": "16"}  # no token_ids
    raw = load_file(path)
    assert sorted(raw) == ["layers.0.key", "layers.0.value", "layers.1.key", "layers.1.value"]
    assert raw["layers.0.key"].shape == (3, 2, 16) and raw["layers.1.value"].dtype == np.float32
    k2, v2, meta2 = load_prefix(path, {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16})
    assert meta2 == {"prefix_ids": [1, 5, 9], "text": "<s> a b", "k_rotated": True}
    for a, b in zip(k + v, k2 + v2):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FormatError, match="already exists"):
        save_prefix(path, k, v, {"prefix_ids": [1, 5, 9]})
    save_prefix(path, k[:1], v[:1], {"prefix_ids": [1, 5, 9]}, overwrite=True)
    assert load_prefix(path)[2] == {"prefix_ids": [1, 5, 9], "text": "", "k_rotated": False}


def test_prefix_kv_round_trip(tmp_path):
    """prefixquant_jax.checkpoint.fp: a PrefixKV comes back with the same arrays (so a model given it computes the
    same logits), ids, text and k_rotated; a config it does not fit is refused."""
    k, v = _kv(seed=1)
    pkv = PrefixKV(k, v, prefix_ids=[1, 5, 9], text="<s> a b", k_rotated=False)
    path = save_prefix_kv(pkv, str(tmp_path / "p.safetensors"))
    assert load_file(path)["layers.0.key"].shape == (3, CONFIG.num_kv_heads, CONFIG.head_dim)
    again = load_prefix_kv(path, CONFIG)
    assert list(again.prefix_ids) == [1, 5, 9] and again.text == "<s> a b" and not again.k_rotated
    for a, b in zip(list(pkv.k) + list(pkv.v), list(again.k) + list(again.v)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(UserError, match="already exists"):
        save_prefix_kv(pkv, path)
    with pytest.raises(UserError, match="does not fit"):
        load_prefix_kv(path, replace(CONFIG, num_layers=3))


def test_model_prefix_round_trip(tiny_dir, tmp_path):
    """A real model's prefix KV is stored as [P, kv_heads, head_dim] per layer and comes back bit for bit."""
    ck = load_checkpoint(tiny_dir)
    pkv = compute_prefix_kv(Decoder(ck.config, ck.params), [1, 5, 9], text="<s> a b")
    path = save_prefix_kv(pkv, str(tmp_path / "p.safetensors"))
    assert load_file(path)["layers.0.key"].shape == (3, ck.config.num_kv_heads, ck.config.head_dim)
    again = load_prefix_kv(path, ck.config)
    assert list(again.prefix_ids) == [1, 5, 9] and again.text == "<s> a b"
    for a, b in zip(list(pkv.k) + list(pkv.v), list(again.k) + list(again.v)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_file_without_prefix_ids_is_refused(tmp_path):
    """A file whose metadata names the ids only under their old name `token_ids` does not load (one line)."""
    k, v = _kv()
    path = save_prefix(str(tmp_path / "new.safetensors"), k, v, {"prefix_ids": [1, 5, 9]})
    with safe_open(path, framework="np") as f:
        meta = f.metadata()
    old = str(tmp_path / "old.safetensors")
    save_file(load_file(path), old, metadata={**{m: x for m, x in meta.items() if m != "prefix_ids"},
                                              "token_ids": json.dumps([1, 5, 9])})
    with pytest.raises(FormatError, match="old.safetensors: the metadata names no prefix token ids") as e:
        load_prefix(old)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="names no prefix token ids"):
        load_prefix_kv(old)


def test_bad_prefix_files(tmp_path):
    with pytest.raises(FormatError, match="does not exist"):
        load_prefix(str(tmp_path / "none.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(FormatError, match="cannot read"):
        load_prefix(str(bad))
    with pytest.raises(UserError, match="cannot read"):
        load_prefix_kv(str(bad))
    k, v = _kv(p=2)
    path = save_prefix(str(tmp_path / "p.safetensors"), k, v, {"prefix_ids": [1, 2]})
    with pytest.raises(FormatError, match=r"prefix KV for 2 layers of \(2, 2, 16\) does not fit the model "
                                          r"\(3 layers of \(2, 2, 16\)\)"):
        load_prefix(path, {"num_layers": 3, "num_kv_heads": 2, "head_dim": 16})
    with pytest.raises(FormatError, match="does not fit"):
        load_prefix(path, {"num_layers": 2, "num_kv_heads": 4, "head_dim": 16})
    other = str(tmp_path / "other.safetensors")
    save_file(load_file(path), other, metadata={"format": "something-else/1"})
    with pytest.raises(FormatError, match="not a prefix KV file of format"):
        load_prefix(other)
    partial = str(tmp_path / "partial.safetensors")
    tensors = load_file(path)
    del tensors["layers.1.value"]
    with safe_open(path, framework="np") as f:
        save_file(tensors, partial, metadata=f.metadata())
    with pytest.raises(FormatError, match="missing tensor layers.1.value"):
        load_prefix(partial)
