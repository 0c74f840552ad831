"""Single-token decode attention (GQA) over an FP prefix plus an int4 asymmetric KV cache.

Shapes / dtypes:
  q                 [B, H, hd]          bf16 or f32 (one new token per batch row)
  prefix_k/v        [P, KV, hd] or None bf16/f32, shared by every batch row (PrefixQuant's FP prefix)
  k_cache/v_cache   int8 [B, T, KV, hd/2]  uint4 codes packed along hd (pallas_kernels.int4 nibble order)
  lengths           int32 [B]           valid cache rows per batch row (rows >= lengths[b] are masked)
  k_scale, k_zero, v_scale, v_zero   f32 [KV]  static per-KV-head asymmetric quantizer
  result            [B, H, hd] in q.dtype

Semantics: query head j attends with KV head j // (H // KV) (the jnp.repeat convention of
prefixquant_jax.model) over keys [prefix rows 0..P-1] + [cache rows 0..lengths[b]-1], softmax in f32
with scale sm_scale (default 1/sqrt(hd)). If there is no key at all the output is 0.

KV quantization (the project's KV quantizer: asymmetric, per head, static): codes c in [0, 15],
x ~= (c - zero) * scale. Codes are stored as nibbles with the int4.py layout (low nibble = even hd
index); pack_int4 already produces the right bytes for codes 8..15 (it wraps, the bit pattern is the
same), see pack_kv_uint4. The kernel unpacks with a mask (c = byte & 0xF, (byte >> 4) & 0xF) and
never dequantizes explicitly, using
    q . k = scale_k * (q . c_k - zero_k * sum(q)),    sum_t p_t v_t = scale_v * (p . c_v - zero_v * sum(p)).
Nibbles are not re-interleaved: q is split into even/odd hd halves in the wrapper, so q . c_k is
q_even . lo + q_odd . hi, and the output is produced as even/odd halves that the wrapper interleaves.

Kernel: grid (B, KV, splits); a program takes all G = H/KV query heads of one KV head (padded to
>= 16 rows for Triton's dot) and one contiguous range of cache blocks (flash-decoding split), runs an
online softmax over the prefix block (split 0 only) and its cache blocks of block_t rows, stopping at
lengths[b]; the wrapper merges the splits' (o, max, sum) with a log-sum-exp combine. T is padded to a
multiple of block_t (a copy: allocate caches with max_len a multiple of block_t to avoid it).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    MIN_DOT,
    cdiv,
    next_pow2,
    pad_axis,
    pad_to,
    resolve_interpret,
    triton_params,
    unpack_lo_hi_unsigned,
)
from pallas_kernels.int4 import pack_int4, unpack_int4

NEG = -1e30  # finite "minus infinity": masked scores never produce NaNs in exp(NEG - NEG)


def _dot_t(a, b):
    """a [R, d] . b [C, d]^T -> [R, C] in f32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _attn_kernel(len_ref, prm_ref, qe_ref, qo_ref, *refs, P: int, block_t: int, blocks_per_split: int,
                 sm_scale: float):
    if P:
        pke_ref, pko_ref, pve_ref, pvo_ref, k_ref, v_ref, oe_ref, oo_ref, m_ref, l_ref = refs
    else:
        k_ref, v_ref, oe_ref, oo_ref, m_ref, l_ref = refs
    split = pl.program_id(2)
    qe, qo = qe_ref[...], qo_ref[...]
    cdt = qe.dtype
    gp, hdh = qe.shape
    qsum = jnp.sum(qe.astype(jnp.float32) + qo.astype(jnp.float32), axis=1, keepdims=True)
    ks, kz, vs, vz = prm_ref[0, 0], prm_ref[0, 1], prm_ref[0, 2], prm_ref[0, 3]

    def update(carry, s, valid, pv):
        m, l, oe, oo = carry
        s = jnp.where(valid, s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
        pe, po = pv(p)
        return m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True), alpha * oe + pe, alpha * oo + po

    carry = (jnp.full((gp, 1), NEG, jnp.float32), jnp.zeros((gp, 1), jnp.float32),
             jnp.zeros((gp, hdh), jnp.float32), jnp.zeros((gp, hdh), jnp.float32))
    if P:
        pp = pke_ref.shape[0]
        s = (_dot_t(qe, pke_ref[...].astype(cdt)) + _dot_t(qo, pko_ref[...].astype(cdt))) * sm_scale
        valid = (jax.lax.broadcasted_iota(jnp.int32, (1, pp), 1) < P) & (split == 0)

        def pv_prefix(p):
            pc = p.astype(cdt)
            return (jnp.dot(pc, pve_ref[...].astype(cdt), preferred_element_type=jnp.float32),
                    jnp.dot(pc, pvo_ref[...].astype(cdt), preferred_element_type=jnp.float32))
        carry = update(carry, s, valid, pv_prefix)

    length = jnp.minimum(len_ref[0, 0], k_ref.shape[0])

    def body(j, carry):
        start = pl.multiple_of(j * block_t, block_t)
        k_lo, k_hi = unpack_lo_hi_unsigned(k_ref[pl.ds(start, block_t), :])
        raw = _dot_t(qe, k_lo.astype(cdt)) + _dot_t(qo, k_hi.astype(cdt))
        s = ks * (raw - kz * qsum) * sm_scale
        valid = (start + jax.lax.broadcasted_iota(jnp.int32, (1, block_t), 1)) < length

        def pv_cache(p):
            v_lo, v_hi = unpack_lo_hi_unsigned(v_ref[pl.ds(start, block_t), :])
            pc = p.astype(cdt)
            zsum = vz * jnp.sum(p, axis=1, keepdims=True)
            return (vs * (jnp.dot(pc, v_lo.astype(cdt), preferred_element_type=jnp.float32) - zsum),
                    vs * (jnp.dot(pc, v_hi.astype(cdt), preferred_element_type=jnp.float32) - zsum))
        return update(carry, s, valid, pv_cache)

    first = split * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, (length + block_t - 1) // block_t)
    m, l, oe, oo = jax.lax.fori_loop(first, last, body, carry)
    oe_ref[...], oo_ref[...], m_ref[...], l_ref[...] = oe, oo, m, l


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_t", "num_splits", "interpret"))
def decode_attention(q, k_cache, v_cache, lengths, k_scale, k_zero, v_scale, v_zero, prefix_k=None, prefix_v=None,
                     *, sm_scale: float | None = None, block_t: int | None = None, num_splits: int | None = None,
                     interpret: bool | None = None):
    """Decode attention of q [B, H, hd] over prefix_k/v [P, KV, hd] + int4 cache [B, T, KV, hd/2]; see module doc."""
    B, H, hd = q.shape
    Bc, T, KV, hdh = k_cache.shape
    if Bc != B or v_cache.shape != k_cache.shape or hd != 2 * hdh or H % KV:
        raise ValueError(f"bad shapes: q {q.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape}")
    G = H // KV
    gp = max(MIN_DOT, next_pow2(G))
    sm_scale = 1.0 / math.sqrt(hd) if sm_scale is None else float(sm_scale)
    bt = block_t or max(MIN_DOT, min(64, next_pow2(T)))
    nblk = cdiv(T, bt)
    if num_splits is None:  # enough programs to fill a GPU (~2 per SM of 132), at most one per block
        num_splits = max(1, min(nblk, cdiv(264, B * KV)))
    bps = cdiv(nblk, num_splits)
    num_splits = cdiv(nblk, bps)
    interpret = resolve_interpret(interpret)

    q4 = pad_to(q.reshape(B, KV, G, hd), 2, gp)
    kc = pad_axis(k_cache.astype(jnp.int8), 1, bt)
    vc = pad_axis(v_cache.astype(jnp.int8), 1, bt)
    Tp = kc.shape[1]
    lens = jnp.asarray(lengths, jnp.int32).reshape(B, 1)
    prm = jnp.stack([jnp.asarray(a, jnp.float32).reshape(KV) for a in (k_scale, k_zero, v_scale, v_zero)], axis=1)

    P = 0 if prefix_k is None else prefix_k.shape[0]
    qspec = pl.BlockSpec((None, None, gp, hdh), lambda b, h, s: (b, h, 0, 0))
    in_specs = [pl.BlockSpec((1, 1), lambda b, h, s: (b, 0)), pl.BlockSpec((1, 4), lambda b, h, s: (h, 0)),
                qspec, qspec]
    args = [lens, prm, q4[..., 0::2], q4[..., 1::2]]
    if P:
        pp = max(MIN_DOT, next_pow2(P))
        pspec = pl.BlockSpec((pp, None, hdh), lambda b, h, s: (0, h, 0))
        for a in (prefix_k, prefix_v):
            a = pad_to(a.astype(q.dtype), 0, pp)
            args += [a[..., 0::2], a[..., 1::2]]
        in_specs += [pspec] * 4
    cspec = pl.BlockSpec((None, Tp, None, hdh), lambda b, h, s: (b, 0, h, 0))
    in_specs += [cspec, cspec]
    args += [kc, vc]

    ospec = pl.BlockSpec((None, None, None, gp, hdh), lambda b, h, s: (b, h, s, 0, 0))
    sspec = pl.BlockSpec((None, None, None, gp, 1), lambda b, h, s: (b, h, s, 0, 0))
    oshape = jax.ShapeDtypeStruct((B, KV, num_splits, gp, hdh), jnp.float32)
    sshape = jax.ShapeDtypeStruct((B, KV, num_splits, gp, 1), jnp.float32)
    kernel = functools.partial(_attn_kernel, P=P, block_t=bt, blocks_per_split=bps, sm_scale=sm_scale)
    oe, oo, m, l = pl.pallas_call(
        kernel,
        out_shape=(oshape, oshape, sshape, sshape),
        grid=(B, KV, num_splits),
        in_specs=in_specs,
        out_specs=(ospec, ospec, sspec, sspec),
        interpret=interpret,
        compiler_params=triton_params(),
        name="decode_attention",
    )(*args)

    # merge the splits: o = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s
    mx = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - mx)
    denom = jnp.sum(w * l, axis=2)
    o = jnp.stack([jnp.sum(w * oe, axis=2), jnp.sum(w * oo, axis=2)], axis=-1).reshape(B, KV, gp, hd)
    o = jnp.where(denom > 0, o / jnp.where(denom > 0, denom, 1.0), 0.0)
    return o[:, :, :G].reshape(B, H, hd).astype(q.dtype)


def pack_kv_uint4(x, scale, zero):
    """Quantize x [..., KV, hd] to codes in [0, 15] and pack along hd. (scale, zero): per head [KV], or
    any shape that broadcasts against x[..., 0] (e.g. per token and head [B, L, KV])."""
    s = jnp.asarray(scale, jnp.float32)[..., None]
    z = jnp.asarray(zero, jnp.float32)[..., None]
    codes = jnp.clip(jnp.round(x.astype(jnp.float32) / s) + z, 0, 15)
    return pack_int4(codes.astype(jnp.int8), axis=-1)


def unpack_kv_uint4(packed, scale, zero):
    """Dequantize packed [..., KV, hd/2] uint4 codes: (c - zero) * scale, float32 [..., KV, hd]; (scale, zero)
    as in pack_kv_uint4."""
    codes = (unpack_int4(packed, axis=-1) & 0xF).astype(jnp.float32)
    return (codes - jnp.asarray(zero, jnp.float32)[..., None]) * jnp.asarray(scale, jnp.float32)[..., None]


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def decode_attention_ref(q, k_cache, v_cache, lengths, k_scale, k_zero, v_scale, v_zero, prefix_k=None,
                         prefix_v=None, *, sm_scale: float | None = None):
    """Plain-jnp reference: dequantize the cache, prepend the prefix, masked softmax attention in f32."""
    B, H, hd = q.shape
    T, KV = k_cache.shape[1], k_cache.shape[2]
    sm_scale = 1.0 / math.sqrt(hd) if sm_scale is None else sm_scale
    k = unpack_kv_uint4(k_cache, k_scale, k_zero)
    v = unpack_kv_uint4(v_cache, v_scale, v_zero)
    valid = jnp.arange(T)[None, :] < jnp.asarray(lengths)[:, None]  # [B, T]
    if prefix_k is not None and prefix_k.shape[0]:
        P = prefix_k.shape[0]
        k = jnp.concatenate([jnp.broadcast_to(prefix_k.astype(jnp.float32), (B, P, KV, hd)), k], axis=1)
        v = jnp.concatenate([jnp.broadcast_to(prefix_v.astype(jnp.float32), (B, P, KV, hd)), v], axis=1)
        valid = jnp.concatenate([jnp.ones((B, P), bool), valid], axis=1)
    k = jnp.repeat(k, H // KV, axis=2)
    v = jnp.repeat(v, H // KV, axis=2)
    s = jnp.einsum("bhd,bthd->bht", q.astype(jnp.float32), k, precision=jax.lax.Precision.HIGHEST) * sm_scale
    s = jnp.where(valid[:, None, :], s, -jnp.inf)
    mx = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(valid[:, None, :], jnp.exp(s - jnp.where(jnp.isfinite(mx), mx, 0.0)), 0.0)
    den = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bht,bthd->bhd", p, v, precision=jax.lax.Precision.HIGHEST) / jnp.where(den > 0, den, 1.0)
    return o.astype(q.dtype)
