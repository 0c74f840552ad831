"""Prefix KV export -> import is exact and gives identical logits; bad files give one-line errors."""
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints_convert import load_checkpoint
from checkpoints_convert.prefix_io import load_prefix_kv, save_prefix_kv
from prefixquant_jax.errors import UserError
from prefixquant_jax.kv_cache import KVCache
from prefixquant_jax.model import Llama
from prefixquant_jax.prefix.prefix_kv import PrefixKV, compute_prefix_kv
from tests.conftest import rng_tokens


def test_round_trip_identical_logits(tiny_dir, tmp_path):
    ck = load_checkpoint(tiny_dir)
    m = Llama.from_params(ck.config, ck.params)
    pkv = compute_prefix_kv(m, [1, 5, 9], text="<s> a b")
    path = save_prefix_kv(pkv, str(tmp_path / "p.safetensors"))
    from safetensors.numpy import load_file
    raw = load_file(path)
    assert raw["layers.0.key"].shape == (3, ck.config.num_kv_heads, ck.config.head_dim)
    again = load_prefix_kv(path, ck.config)
    assert again.prefix_ids == [1, 5, 9] and again.text == "<s> a b" and not again.k_rotated
    win = jnp.asarray(rng_tokens(12, ck.config.vocab_size)[None])
    a, _ = m(win, KVCache.with_prefix(pkv, 1, 15), 3)
    b, _ = m(win, KVCache.with_prefix(again, 1, 15), 3)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(UserError, match="already exists"):
        save_prefix_kv(pkv, path)


def test_prefix_file_written_before_the_rename_loads(tiny_dir, tmp_path):
    """A file whose metadata names the ids only `token_ids` (the old name) loads with the same prefix_ids and KV;
    new files carry both keys (older readers look for token_ids); PrefixKV(token_ids=...) still builds one."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    ck = load_checkpoint(tiny_dir)
    pkv = compute_prefix_kv(Llama.from_params(ck.config, ck.params), [1, 5, 9], text="<s> a b")
    path = save_prefix_kv(pkv, str(tmp_path / "new.safetensors"))
    with safe_open(path, framework="np") as f:
        meta = f.metadata()
    assert meta["prefix_ids"] == meta["token_ids"] == "[1, 5, 9]"
    old = str(tmp_path / "old.safetensors")
    save_file(load_file(path), old, metadata={k: v for k, v in meta.items() if k != "prefix_ids"})
    back = load_prefix_kv(old, ck.config)
    assert back.prefix_ids == back.token_ids == [1, 5, 9] and back.text == "<s> a b"
    for a, b in zip(back.k + back.v, pkv.k + pkv.v):
        np.testing.assert_array_equal(a, b)
    none = str(tmp_path / "none.safetensors")
    save_file(load_file(path), none, metadata={k: v for k, v in meta.items() if k not in ("prefix_ids", "token_ids")})
    with pytest.raises(UserError, match="names no prefix token ids"):
        load_prefix_kv(none)
    assert PrefixKV(k=pkv.k, v=pkv.v, token_ids=[1, 5, 9]).prefix_ids == [1, 5, 9]


def test_bad_prefix_files(tiny_dir, tmp_path):
    ck = load_checkpoint(tiny_dir)
    with pytest.raises(UserError, match="does not exist"):
        load_prefix_kv(str(tmp_path / "none.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="cannot read"):
        load_prefix_kv(str(bad))
    m = Llama.from_params(ck.config, ck.params)
    path = save_prefix_kv(compute_prefix_kv(m, [1, 2]), str(tmp_path / "p.safetensors"))
    from dataclasses import replace
    with pytest.raises(UserError, match="does not fit"):
        load_prefix_kv(path, replace(ck.config, num_layers=3))
