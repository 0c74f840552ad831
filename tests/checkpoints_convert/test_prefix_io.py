"""Prefix KV export -> import is exact and gives identical logits; bad files give one-line errors."""
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints_convert import load_checkpoint
from checkpoints_convert.prefix_io import load_prefix_kv, save_prefix_kv
from prefixquant_jax.errors import UserError
from prefixquant_jax.kv_cache import KVCache
from prefixquant_jax.model import Llama
from prefixquant_jax.prefix.prefix_kv import compute_prefix_kv
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
    assert again.token_ids == [1, 5, 9] and again.text == "<s> a b" and not again.k_rotated
    win = jnp.asarray(rng_tokens(12, ck.config.vocab_size)[None])
    a, _ = m(win, KVCache.with_prefix(pkv, 1, 15), 3)
    b, _ = m(win, KVCache.with_prefix(again, 1, 15), 3)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(UserError, match="already exists"):
        save_prefix_kv(pkv, path)


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
