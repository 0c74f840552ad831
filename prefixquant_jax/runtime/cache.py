"""The packed model's integer KV cache: one layer's codes, behind nn/cache.py's LayerKV interface (write, read,
decode).

k, v: 4-bit KV int8 [B, T, KV, hd/2] (uint4 codes packed along hd, the decode_attention layout) or 8-bit KV uint8
[B, T, KV, hd]; row t holds position P + t. Static KV quantizes with the layer's per-head (scale, zero) from its
qparams; dynamic KV keeps each row's own (scale, zero) beside its codes in k_sz / v_sz, f32 [B, T, KV, 2]
(empty [0] for static KV). Reading dequantizes, then lets the recipe map the values back (FlatQuant behind an FP
prefix: P^-1); a one-token step on the kernels backend with 4-bit static KV attends straight from the codes
(pallas_kernels.decode_attention, the FP prefix as its first block).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import next_pow2, round_up
from pallas_kernels.decode_attention import decode_attention, pack_kv_uint4, unpack_kv_uint4
from prefixquant_jax.quant.qarray import EPS, QArray


def cache_rows(rows: int) -> int:
    """`rows` rounded up to decode_attention's block (its default block_t), so it never pads (copies) the cache."""
    return round_up(rows, max(16, min(64, next_pow2(rows))))


def static_kv(qparams, site: str):
    """The static per-head (scale [KV], zero [KV]) the runtime quantizes a KV site with: the fake quantizer's own
    (scale floored at EPS, zero point rounded to a code)."""
    q = qparams[site]
    scale = jnp.maximum(q["scale"][...].astype(jnp.float32), EPS).reshape(-1)
    zero = jnp.round(q["zero"][...].astype(jnp.float32)).reshape(-1) if "zero" in q else jnp.zeros_like(scale)
    return scale, zero


def quantize_kv(x, scale, zero, bits: int):
    """x [B, L, KV, hd] -> codes clip(round(x / scale) + zero, 0, 2^bits - 1), (scale, zero) per head [KV] or per
    token and head [B, L, KV]; 4 bits: int8 [B, L, KV, hd/2] packed; 8 bits: uint8 [B, L, KV, hd]."""
    if bits == 4:
        return pack_kv_uint4(x, scale, zero)
    c = jnp.round(x.astype(jnp.float32) / scale[..., None]) + zero[..., None]
    return jnp.clip(c, 0, 255).astype(jnp.uint8)


def dequantize_kv(codes, scale, zero, bits: int):
    """(codes - zero) * scale, float32 [B, T, KV, hd]; (scale, zero) as in quantize_kv."""
    if bits == 4:
        return unpack_kv_uint4(codes, scale, zero)
    return (codes.astype(jnp.float32) - zero[..., None]) * scale[..., None]


def kv_qarray(codes, scale, zero, bits: int, dynamic: bool) -> QArray:
    """What a KV site of the packed model hands its cache: codes with (scale, zero) per head or per (token, head)."""
    return QArray(qvalue=codes, scale=scale, zero_point=zero, bits=bits, granularity="token" if dynamic else "head",
                  packed_axis=3 if bits == 4 else None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantKV:
    """One layer's integer K/V rows (module docstring)."""

    k: jax.Array
    v: jax.Array
    k_sz: jax.Array
    v_sz: jax.Array
    bits: int = dataclasses.field(metadata={"static": True})
    dynamic: bool = dataclasses.field(metadata={"static": True})

    @classmethod
    def empty(cls, config, batch: int, rows: int, bits: int, dynamic: bool) -> "QuantKV":
        shape = (batch, rows, config.num_kv_heads, config.head_dim // 2 if bits == 4 else config.head_dim)
        dt = jnp.int8 if bits == 4 else jnp.uint8
        sz = (batch, rows, config.num_kv_heads, 2) if dynamic else (0,)
        return cls(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt), k_sz=jnp.zeros(sz, jnp.float32),
                   v_sz=jnp.zeros(sz, jnp.float32), bits=bits, dynamic=dynamic)

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    def write(self, k: QArray, v: QArray, row) -> "QuantKV":
        """The KV sites' codes (kv_qarray) written at rows row..row+L-1 (and, dynamic KV, their (scale, zero))."""
        put = lambda a, b: jax.lax.dynamic_update_slice(a, b, (0, row, 0, 0))
        k_sz, v_sz = self.k_sz, self.v_sz
        if self.dynamic:
            k_sz = put(k_sz, jnp.stack([k.scale, k.zero_point], axis=-1))
            v_sz = put(v_sz, jnp.stack([v.scale, v.zero_point], axis=-1))
        return dataclasses.replace(self, k=put(self.k, k.qvalue), v=put(self.v, v.qvalue), k_sz=k_sz, v_sz=v_sz)

    def _qparams(self, block, site: str, sz):
        return (sz[..., 0], sz[..., 1]) if self.dynamic else static_kv(block.qparams, site)

    def read(self, block):
        """Every row dequantized (float32), as attention reads it (the recipe maps it back where it must)."""
        k = dequantize_kv(self.k, *self._qparams(block, "k_cache", self.k_sz), self.bits)
        v = dequantize_kv(self.v, *self._qparams(block, "v_cache", self.v_sz), self.bits)
        return block.recipe.kv_back("k_cache", k, block), block.recipe.kv_back("v_cache", v, block)

    def decode(self, q, block, pos):
        """decode_attention of one token q [B, 1, H, hd] straight from 4-bit static codes (kernels backend), or None
        where it does not apply (8-bit or dynamic KV, K/V mapped back by P^-1, the xla backend)."""
        rt = block.recipe
        if rt.backend != "kernels" or self.bits != 4 or self.dynamic or rt.maps_kv_back:
            return None
        B, _, H, hd = q.shape
        row = pos - block.prefix_len
        lengths = jnp.full((B,), row + 1, jnp.int32)
        pk = None if block.prefix_k is None else block.prefix_k[...]
        pv = None if block.prefix_v is None else block.prefix_v[...]
        fn = functools.partial(decode_attention, interpret=rt.interpret)
        o = fn(q[:, 0], self.k, self.v, lengths, *static_kv(block.qparams, "k_cache"),
               *static_kv(block.qparams, "v_cache"), pk, pv)
        return o.reshape(B, 1, H * hd)

