"""KV cache pytree. The FP prefix of PrefixQuant is simply its first rows.

Layout: `k[i]`, `v[i]` are [batch, max_len, kv_heads, head_dim] for layer i. Rows are written at
positions [offset, offset + L) by a forward call; rows >= offset + L are masked out by causality, so
an unfilled tail is harmless. Rows holding the prefix are written once in full precision and never
re-quantized (quantizers apply to new rows only, before they are written).
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
