"""Decode attention over FP prefix + int4 asymmetric KV cache vs an independent float64 numpy reference."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    decode_attention,
    decode_attention_ref,
    pack_kv_uint4,
    unpack_int4,
)


def np_attention(q, kc, vc, lengths, ks, kz, vs, vz, pk, pv):
    """float64: nibbles by bit arithmetic, (c - zero) * scale, prefix rows first, head j -> kv head j // G."""
    def deq(packed, s, z):
        b = np.asarray(packed).astype(np.int64) & 0xFF
        c = np.stack([b & 0xF, b >> 4], axis=-1).reshape(*b.shape[:-1], -1)  # low nibble = even index
        return (c - np.asarray(z, np.float64)[:, None]) * np.asarray(s, np.float64)[:, None]
    q = np.asarray(q, np.float64)
    B, H, hd = q.shape
    k, v = deq(kc, ks, kz), deq(vc, vs, vz)
    KV = k.shape[2]
    out = np.zeros((B, H, hd))
    for b in range(B):
        kb, vb = k[b, :lengths[b]], v[b, :lengths[b]]
        if pk is not None:
            kb = np.concatenate([np.asarray(pk, np.float64), kb])
            vb = np.concatenate([np.asarray(pv, np.float64), vb])
        for h in range(H):
            g = h // (H // KV)
            if kb.shape[0] == 0:
                continue
            s = kb[:, g] @ q[b, h] / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[b, h] = p @ vb[:, g] / p.sum()
    return out


def random_decode_inputs(rng, B, H, KV, hd, T, P, dtype):
    """(q, k codes, v codes, k_scale, k_zero, v_scale, v_zero, prefix_k, prefix_v): random per-head
    quantizers, caches of normal values packed as uint4, a prefix of P rows (None when P = 0)."""
    q = jnp.asarray(rng.standard_normal((B, H, hd)), dtype)
    ks, vs = rng.uniform(0.2, 0.4, KV).astype(np.float32), rng.uniform(0.2, 0.4, KV).astype(np.float32)
    kz, vz = rng.integers(4, 12, KV).astype(np.float32), rng.integers(4, 12, KV).astype(np.float32)
    kc = pack_kv_uint4(jnp.asarray(rng.standard_normal((B, T, KV, hd)) * 1.5), ks, kz)
    vc = pack_kv_uint4(jnp.asarray(rng.standard_normal((B, T, KV, hd)) * 1.5), vs, vz)
    pk = jnp.asarray(rng.standard_normal((P, KV, hd)) * 2, dtype) if P else None
    pv = jnp.asarray(rng.standard_normal((P, KV, hd)), dtype) if P else None
    return q, kc, vc, ks, kz, vs, vz, pk, pv


CASES = [  # (B, H, KV, hd, T, P, lengths, block_t, num_splits, dtype)
    (2, 8, 2, 32, 37, 3, [37, 5], 16, None, jnp.float32),   # GQA 4:1, T % block_t != 0
    (3, 2, 2, 32, 20, 0, [20, 1, 9], 16, 2, jnp.float32),    # H == KV, no prefix, 2 splits
    (2, 4, 1, 32, 40, 8, [0, 33], 16, 3, jnp.float32),      # empty cache row, prefix only
    (1, 8, 2, 64, 50, 1, [50], None, 1, jnp.bfloat16),      # bf16 q/prefix, default block
]


@pytest.mark.parametrize("B,H,KV,hd,T,P,lengths,block_t,num_splits,dtype", CASES)
def test_decode_attention(B, H, KV, hd, T, P, lengths, block_t, num_splits, dtype):
    q, kc, vc, ks, kz, vs, vz, pk, pv = random_decode_inputs(np.random.default_rng(B * 100 + T + P), B, H, KV, hd,
                                                             T, P, dtype)
    L = jnp.asarray(lengths, jnp.int32)
    out = decode_attention(q, kc, vc, L, ks, kz, vs, vz, pk, pv, block_t=block_t, num_splits=num_splits)
    assert out.shape == (B, H, hd) and out.dtype == dtype
    expected = np_attention(q, kc, vc, lengths, ks, kz, vs, vz, pk, pv)
    if dtype == jnp.float32:
        # f32 softmax/accumulation vs float64: errors ~1e-6 on O(1) outputs
        np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-5)
        ref = decode_attention_ref(q, kc, vc, L, ks, kz, vs, vz, pk, pv)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=1e-5)
    else:
        # bf16: probabilities are cast to bf16 for the P.V dot (relative 2^-8 each) and the output is
        # rounded to bf16; outputs are O(1) (|v| <= ~6), so 3e-2 absolute is ~a few bf16 ulps.
        np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=3e-2, rtol=2e-2)


def test_pack_kv_uint4_codes():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 3, 8)) * 3)
    s, z = np.array([0.3, 0.5, 0.2], np.float32), np.array([8.0, 7.0, 3.0], np.float32)
    p = pack_kv_uint4(x, s, z)
    assert p.shape == (2, 5, 3, 4) and p.dtype == jnp.int8
    codes = np.asarray(unpack_int4(p) & 0xF)
    expected = np.clip(np.round(np.asarray(x, np.float32) / s[:, None]) + z[:, None], 0, 15)
    np.testing.assert_array_equal(codes, expected)
    assert codes.min() == 0 and codes.max() == 15  # both clamps exercised
