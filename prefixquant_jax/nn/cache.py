"""KV caches: Cache(kv, pos), one entry of `kv` per layer.

Positions are absolute everywhere: a model's P prefix tokens sit at 0..P-1 (their K/V are model state,
decoder.Block.prefix_k / prefix_v, never in a cache), the first token after them at P. A cache holds the rows
of the tokens after the prefix: position `pos` is row `pos - P`. `Cache.pos` is the position the next token is
written at. Rows at or past it are masked by causality, so an unwritten tail is harmless.

`LayerKV` is the float cache of the fake-quant and FP models (the K/V sites have already fake-quantized what
it stores); the packed integer model keeps integer codes instead (runtime/cache.py), behind the same two
methods: `write(k, v, row)` and `read(block)`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerKV:
    """One layer's float K and V rows, each [B, T, KV, hd]."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def empty(cls, config, batch: int, rows: int, dtype=jnp.float32) -> "LayerKV":
        shape = (batch, rows, config.num_kv_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    def write(self, k, v, row) -> "LayerKV":
        """k, v [B, L, KV, hd] written at rows row..row+L-1."""
        return LayerKV(k=jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), (0, row, 0, 0)),
                       v=jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), (0, row, 0, 0)))

    def read(self, block):
        """The rows as attention reads them (here: as stored)."""
        return self.k, self.v

    def decode(self, q, block, pos):
        """A fused one-token attention over this cache, or None: a float cache has none."""
        return None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Cache:
    """Every layer's rows (`kv[i]`: a LayerKV or the runtime's QuantKV) and the next position (int32 [])."""

    kv: list
    pos: jax.Array

    @property
    def rows(self) -> int:
        return self.kv[0].rows


@dataclasses.dataclass(frozen=True)
class PrefixKV:
    """The FP prefix as portable data (prefix files, options, reports): per layer k[i], v[i] [P, KV, hd] float32
    numpy, the prefix token ids, their text, and whether K was stored after the online R3 Hadamard. Inside a model
    the same arrays are its state (decoder.Block.prefix_k / prefix_v; `Decoder.prefix_kv` gives them back)."""

    k: tuple
    v: tuple
    prefix_ids: tuple[int, ...]
    text: str = ""
    k_rotated: bool = False

    def __post_init__(self):
        object.__setattr__(self, "k", tuple(self.k))
        object.__setattr__(self, "v", tuple(self.v))
        object.__setattr__(self, "prefix_ids", tuple(int(t) for t in self.prefix_ids))

    @property
    def length(self) -> int:
        return len(self.prefix_ids)
