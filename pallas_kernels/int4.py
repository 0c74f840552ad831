"""Packed signed int4: two nibbles per int8 byte.

Layout (fixed; checkpoints and every kernel use it): codes q in [-8, 7] along the packed axis are
paired (q[2j], q[2j+1]) into one byte as  byte = (q[2j] & 0xF) | (q[2j+1] << 4),  stored as int8.
So the packed axis halves in length and must be even. Weights [in, out] are packed along `in`
(axis 0, the contraction axis); activations [M, K] and KV [.., head_dim] along their last axis.
Unpacking sign-extends each nibble: low = (byte << 4) >> 4, high = byte >> 4 (arithmetic shifts).
"""
from __future__ import annotations

import jax.numpy as jnp


def pack_int4(q, axis: int = -1):
    """int codes in [-8, 7] (any int dtype) -> int8 with `axis` halved. Values outside are wrapped, not clamped."""
    q = jnp.asarray(q)
    axis = axis % q.ndim
    n = q.shape[axis]
    if n % 2:
        raise ValueError(f"pack_int4: axis {axis} has odd length {n}")
    q = jnp.moveaxis(q.astype(jnp.int8), axis, -1)
    lo, hi = q[..., 0::2], q[..., 1::2]
    packed = (lo & 0xF) | (hi << 4)  # int8 arithmetic: hi << 4 keeps the low nibble of hi in the top bits
    return jnp.moveaxis(packed.astype(jnp.int8), -1, axis)


def unpack_int4(p, axis: int = -1):
    """int8 packed bytes -> int8 codes in [-8, 7] with `axis` doubled (inverse of pack_int4)."""
    p = jnp.asarray(p).astype(jnp.int8)
    axis = axis % p.ndim
    p = jnp.moveaxis(p, axis, -1)
    lo = jnp.right_shift(jnp.left_shift(p, 4), 4)
    hi = jnp.right_shift(p, 4)
    q = jnp.stack([lo, hi], axis=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    return jnp.moveaxis(q, -1, axis)
