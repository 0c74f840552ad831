"""KV cache pytree. The FP prefix of PrefixQuant is simply its first rows.

Layout: `k[i]`, `v[i]` are [batch, max_len, kv_heads, head_dim] for layer i. Rows are written at
positions [offset, offset + L) by a forward call; rows >= offset + L are masked out by causality, so
an unfilled tail is harmless. Rows holding the prefix are written once in full precision and never
re-quantized (quantizers apply to new rows only, before they are written).

One position convention everywhere: positions are absolute, the P prefix tokens at 0..P-1 and the first
token after them at P; cache row = position. `behind_prefix` is the one way every forward (eval,
generate, calibration, training, QuantizedModel.apply) gets its cache behind the FP prefix. (The real
runtime keeps the prefix apart from its int cache, whose rows are positions - P: runtime/model.py.)
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: list  # per layer [B, T, kv_heads, head_dim]
    v: list

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @classmethod
    def empty(cls, config, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch, max_len, config.num_kv_heads, config.head_dim)
        return cls(k=[jnp.zeros(shape, dtype) for _ in range(config.num_layers)],
                   v=[jnp.zeros(shape, dtype) for _ in range(config.num_layers)])

    @classmethod
    def with_prefix(cls, prefix_kv, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        """A cache of `max_len` rows whose first rows hold `prefix_kv` (a PrefixKV or KVCache of batch 1)."""
        def grow(a):
            a = jnp.broadcast_to(a[:1].astype(dtype), (batch,) + a.shape[1:])
            pad = max_len - a.shape[1]
            return jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return cls(k=[grow(a) for a in prefix_kv.k], v=[grow(a) for a in prefix_kv.v])

    def truncate(self, length: int) -> "KVCache":
        return KVCache(k=[a[:, :length] for a in self.k], v=[a[:, :length] for a in self.v])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Cache:
    """A KV cache and the absolute position of the next token: what QuantizedModel.apply threads through
    decoding (QuantizedModel.init_cache makes one holding the FP prefix, pos = P)."""
    kv: KVCache
    pos: jax.Array  # int32 []: the position the next token is written at

    @property
    def max_len(self) -> int:
        return self.kv.max_len


def prefix_len(prefix_kv) -> int:
    """P, the number of prefix tokens (rows 0..P-1 of every cache behind it); 0 without a prefix."""
    return 0 if prefix_kv is None else prefix_kv.length


def behind_prefix(prefix_kv, config, batch: int, length: int, dtype=jnp.float32, layers=None) -> tuple[KVCache, int]:
    """(cache, offset) for `length` new tokens behind the FP prefix `prefix_kv` (a PrefixKV, or None: no prefix).

    The cache has P + length rows, the first P holding the prefix (batch-broadcast), and offset = P is the
    position of the first new token. `layers`: only those layers' caches (default: every layer)."""
    P = prefix_len(prefix_kv)
    if prefix_kv is None:
        n = config.num_layers if layers is None else len(layers)
        shape = (batch, length, config.num_kv_heads, config.head_dim)
        return KVCache(k=[jnp.zeros(shape, dtype) for _ in range(n)], v=[jnp.zeros(shape, dtype) for _ in range(n)]), 0
    if layers is not None:
        prefix_kv = KVCache(k=[prefix_kv.k[i] for i in layers], v=[prefix_kv.v[i] for i in layers])
    return KVCache.with_prefix(prefix_kv, batch, P + length, dtype), P
