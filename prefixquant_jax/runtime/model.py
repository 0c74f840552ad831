"""Functional real-quant Llama forward over a PackedModel: integer GEMMs and an integer KV cache.

Positions are absolute, as everywhere (kv_cache.py): the P FP prefix tokens at 0..P-1, the first token after
them at P. The FP prefix lives in the PackedModel, so the QuantKVCache holds only what follows it: position
pos is its row pos - P (inside `layer`; `hidden`, `forward` and `decode_step` take positions).
Per layer, for tokens x [B, L, D] at positions pos .. pos + L - 1, cache rows row = pos - P ..:

    h  = RMSNorm(x)                                   float, compute dtype
    qkv_in:  codes, s = quantize(h)                   static [1,1] or dynamic per-token [M,1] scale, no rotation
             (R1 is already in the weights); int4 codes packed two per byte, int8 codes for 8 bits
    q|k|v = GEMM(codes, s, W_qkv)                     W4A4 (a 4 bits) / W4A8 (a 8 bits) kernel, int32
                                                      accumulation, epilogue acc * s_x * s_w; W8: int8 XLA dot
                                                      (+ the q|k|v bias after the epilogue: Qwen2)
    q, k  = R3(RoPE(q)), R3(RoPE(k))                  online Hadamard on head_dim (hadamard_transform);
                                                      Qwen3: RoPE(q_norm(q)), RoPE(k_norm(k)) inside
    k, v  -> codes clip(round(x / s) + z, 0, 2^b-1)   static per head, or dynamic per (token, head) (s, z from
                                                      the token's range, stored beside its codes), written at
                                                      cache rows row..row+L-1
    attention  prefill (L > 1): plain jnp over [FP prefix ; dequantized cache rows] (causal mask);
               decode (L == 1, 4-bit static KV, kernels backend): decode_attention over the FP prefix
               block + the int4 cache; otherwise the same plain jnp attention as prefill
    o_in:    quantize(attn) -> GEMM(W_o)              (R2 is in the weights)
    up_gate_in: quantize(RMSNorm(x)) -> GEMM(W_gate|up), m = silu(gate) * up
    down_in: R4 Hadamard fused into the quantizer (rotate_quant) -> GEMM(W_down)

A site whose preset is FP (ActSpec None) runs the float matmul with the dequantized kernel. FlatQuant
(spec.flat) replaces the rotations by its online transforms and LAC quantizers (runtime/flat.py).
Backends (static, RuntimeSpec.backend): "kernels" runs the Pallas kernels (rotate_quant, w4a4/w4a8
GEMM, decode_attention; sites without a rotation go through rotate_quant with an identity Kronecker
pair); "xla" runs the same integer pipeline through their jnp references (quantize_ref,
w4a4_matmul_ref, w4a8_matmul_ref) and decodes with the model's jnp attention over the dequantized cache
(sized exactly, not rounded up), as the fake-quant model does. 8-bit KV has no decode kernel: decode
then uses the plain jnp attention in both backends; so does dynamic KV (the decode kernel takes one
scale and zero per head, not per cached token).

The quantizers round exactly as prefixquant_jax.quant.ops.fake_quant does, and integer accumulation is
exact, so the logits differ from the default fake-quant model's only by float summation order (and the
rare quantization code that this flips at a rounding tie; a 4-bit model can amplify one such flip on
later tokens, as it amplifies any 1-ulp perturbation of its inputs). The fake model with
QuantRecipe(int_matmul=True) computes the linears as this runtime does; with the "xla" backend the two
give the same numbers. On a GPU, rotate_quant's f32 dots may run in TF32, which rounds the activation
before quantization: more codes at ties then differ from "xla".
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._common import next_pow2, round_up
from pallas_kernels.decode_attention import (
    decode_attention,
    decode_attention_ref,
    pack_kv_uint4,
    unpack_kv_uint4,
)
from pallas_kernels.gemm_w4a4 import w4a4_matmul_ref
from pallas_kernels.gemm_w4a8 import w4a8_matmul_ref
from pallas_kernels.int4 import pack_int4, unpack_int4
from pallas_kernels.rotate_quant import quantize_ref, rotate_quant
from prefixquant_jax.model import apply_rope, attention, rope_tables
from prefixquant_jax.quant.qarray import EPS, QArray, dynamic_qparams
from prefixquant_jax.quant.spec import QuantSpec
from prefixquant_jax.rotate.hadamard import hadamard_kron_factors, hadamard_transform
from prefixquant_jax.runtime import flat
from prefixquant_jax.runtime.kernel_choice import gemm_kernel
from prefixquant_jax.runtime.pack import (
    ActSpec,
    PackedLayer,
    PackedModel,
    RuntimeSpec,
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantKVCache:
    """Integer KV cache of the tokens behind the FP prefix (the prefix lives in the PackedModel).

    k[i], v[i] for layer i: 4-bit KV int8 [B, T, KV, hd/2] (uint4 codes packed along hd, the
    decode_attention layout) or 8-bit KV uint8 [B, T, KV, hd]. Row t holds position P + t. Rows at or
    past the write point are masked by causality, so an unwritten tail (zero codes) is harmless.
    k_sz[i], v_sz[i]: dynamic KV only (else empty lists), f32 [B, T, KV, 2], each row's (scale, zero).
    """

    k: list
    v: list
    k_sz: list = dataclasses.field(default_factory=list)
    v_sz: list = dataclasses.field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.k[0].shape[1]


def cache_rows(rows: int) -> int:
    """`rows` rounded up to decode_attention's block (its default block_t), so it never pads (copies) the cache."""
    return round_up(rows, max(16, min(64, next_pow2(rows))))


def empty_cache(pm: PackedModel, batch: int, rows: int) -> QuantKVCache:
    """A zero cache of `rows` rows for every layer (kernels backend: rounded up by cache_rows)."""
    c, s = pm.config, pm.spec
    T = cache_rows(rows) if s.backend == "kernels" else rows
    shape = (batch, T, c.num_kv_heads, c.head_dim // 2 if s.kv_bits == 4 else c.head_dim)
    dt = jnp.int8 if s.kv_bits == 4 else jnp.uint8
    n = c.num_layers
    sz = [jnp.zeros((batch, T, c.num_kv_heads, 2), jnp.float32) for _ in range(2 * n)] if s.kv_dynamic else []
    return QuantKVCache(k=[jnp.zeros(shape, dt) for _ in range(n)], v=[jnp.zeros(shape, dt) for _ in range(n)],
                        k_sz=sz[:n], v_sz=sz[n:])


def rms_norm(x, w, eps: float):
    """prefixquant_jax.model.RMSNorm as a function: fp32 statistics, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


@functools.cache
def identity_pair(K: int) -> tuple[np.ndarray, np.ndarray]:
    """(I_n1, I_n2), n1 * n2 = K, n2 the largest power of two <= 64 dividing K: rotate_quant's "no rotation"."""
    n2 = 2
    while K % (n2 * 2) == 0 and n2 < 64:
        n2 *= 2
    return np.eye(K // n2), np.eye(n2)


def quantize_act(x, a: ActSpec, scale, rotate: bool, backend: str, interpret: bool | None = None):
    """x [M, K] -> (codes, scale): int8 [M, K/2] packed int4 (a.bits 4) or int8 [M, K]; scale f32 [1, 1]
    (static, given) or [M, 1] (dynamic per token). `rotate`: Hadamard over K first (R4)."""
    s = None if a.dynamic else scale
    if backend == "kernels":
        rot = hadamard_kron_factors(x.shape[-1]) if rotate else identity_pair(x.shape[-1])
        return rotate_quant(x, rot, s, bits=a.bits, clip_ratio=a.clip_ratio, full_grid=a.full_grid, interpret=interpret)
    y = hadamard_transform(x) if rotate else x
    q, s = quantize_ref(y.astype(jnp.float32), s, bits=a.bits, clip_ratio=a.clip_ratio, full_grid=a.full_grid)
    return (pack_int4(q, axis=-1) if a.bits == 4 else q), s


def int_matmul(codes, x_scale, a_bits: int, w: QArray, backend: str, out_dtype, interpret: bool | None = None,
               kernels: str = "auto"):
    """(codes x w's codes) * x_scale * w.scale, [M, N] in out_dtype; int32 accumulation. w.qvalue: the
    codes as the kernels take them (4 bits: packed along `in`). kernels: Mosaic GPU or Triton GEMMs
    (runtime/kernel_choice.py)."""
    if w.bits == 4:
        if backend == "kernels":
            fn = gemm_kernel(a_bits, kernels, interpret)
        else:
            fn = w4a4_matmul_ref if a_bits == 4 else w4a8_matmul_ref
        return fn(codes, x_scale, w.qvalue, w.scale, out_dtype)
    qx = unpack_int4(codes, axis=-1) if a_bits == 4 else codes  # W8: no kernel, XLA int8 dot
    acc = jnp.dot(qx, w.qvalue, preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * x_scale * w.scale).astype(out_dtype)


def linear(spec: RuntimeSpec, lp: PackedLayer, site: str, w: QArray, x, rotate: bool = False):
    """The linear fed by activation site `site`: x [..., K] -> [..., N] in the compute dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    a = spec.act_spec(site)
    if spec.flat:  # FlatQuant's online transform of this site (never with a Hadamard: rotate is False)
        pair = flat.kron_pair(lp.flat, site, spec.kv_original_space, x2.shape[-1])
        if spec.backend == "kernels" and pair is not None and a is not None and pair[1].shape[0] % 2 == 0:
            lac = flat.lac_factors(lp.flat, site) if a.dynamic else None  # fused transform + quantize + pack
            codes, s = rotate_quant(x2, pair, None if a.dynamic else lp.act_scale[site], bits=a.bits,
                                    clip_ratio=a.clip_ratio, lac=lac, full_grid=a.full_grid, interpret=spec.interpret)
            return int_matmul(codes, s, a.bits, w, spec.backend, spec.compute_dtype,
                              spec.interpret, spec.kernels).reshape(*lead, -1)
        x2 = flat.site_input(lp.flat, site, x2, spec.kv_original_space)
    if a is None:  # FP activations: float matmul with the dequantized kernel
        y = (hadamard_transform(x2) if rotate else x2) @ w.dequantize(spec.compute_dtype)
    elif spec.flat and a.dynamic and flat.has_lac(lp.flat, site):
        codes, s = flat.lac_act_codes(lp.flat, site, x2, a.bits)
        codes = pack_int4(codes, axis=-1) if a.bits == 4 else codes
        y = int_matmul(codes, s, a.bits, w, spec.backend, spec.compute_dtype, spec.interpret, spec.kernels)
    else:
        codes, s = quantize_act(x2, a, lp.act_scale.get(site), rotate, spec.backend, spec.interpret)
        y = int_matmul(codes, s, a.bits, w, spec.backend, spec.compute_dtype, spec.interpret, spec.kernels)
    return y.reshape(*lead, -1)


def quantize_kv(x, scale, zero, bits: int):
    """x [B, L, KV, hd] -> codes clip(round(x / scale) + zero, 0, 2^bits - 1), (scale, zero) per head [KV]
    or per token and head [B, L, KV]; 4 bits: int8 [B, L, KV, hd/2] packed; 8 bits: uint8 [B, L, KV, hd]."""
    if bits == 4:
        return pack_kv_uint4(x, scale, zero)
    c = jnp.round(x.astype(jnp.float32) / scale[..., None]) + zero[..., None]
    return jnp.clip(c, 0, 255).astype(jnp.uint8)


def dequantize_kv(codes, scale, zero, bits: int):
    """(codes - zero) * scale, float32 [B, T, KV, hd]; (scale, zero) as in quantize_kv."""
    if bits == 4:
        return unpack_kv_uint4(codes, scale, zero)
    return (codes.astype(jnp.float32) - zero[..., None]) * scale[..., None]


def dynamic_kv_qparams(x, bits: int, clip: float):
    """Per-(token, head) asymmetric (scale, zero) of x [B, L, KV, hd], each [B, L, KV]: the fake quantizer's
    own dynamic range rule (quant.ops.dynamic_qparams), so the codes equal the fake-quant model's."""
    spec = QuantSpec(bits=bits, granularity="token", symmetric=False, dynamic=True, clip_ratio=clip)
    scale, zero = dynamic_qparams(x.astype(jnp.float32), spec)
    return jnp.maximum(scale, EPS)[..., 0], zero[..., 0]


def _write_kv(spec: RuntimeSpec, lp: PackedLayer, site: str, x, scale, zero, codes, sz, row):
    """Quantize x [B, L, KV, hd] and write it at cache rows row..row+L-1 of codes (and of sz, dynamic KV)."""
    if spec.kv_dynamic:
        if spec.flat and flat.has_lac(lp.flat, site):
            scale, zero = flat.lac_kv_qparams(lp.flat, site, x, spec.kv_bits)
        else:
            scale, zero = dynamic_kv_qparams(x, spec.kv_bits, spec.kv_clip)
        sz = jax.lax.dynamic_update_slice(sz, jnp.stack([scale, zero], axis=-1), (0, row, 0, 0))
    codes = jax.lax.dynamic_update_slice(codes, quantize_kv(x, scale, zero, spec.kv_bits), (0, row, 0, 0))
    return codes, sz


def _kv_qparams(spec: RuntimeSpec, scale, zero, sz):
    """(scale, zero) to dequantize a cache: the layer's per-head [KV], or the rows' own [B, T, KV]."""
    return (sz[..., 0], sz[..., 1]) if spec.kv_dynamic else (scale, zero)


def _attend_dequantized(spec, lp, q, kv, pk, pv, row):
    """Plain jnp attention of q [B, L, H, hd] over [prefix ; dequantized cache]: [B, L, H * hd]."""
    B = q.shape[0]
    kc, vc, ksz, vsz = kv
    k = dequantize_kv(kc, *_kv_qparams(spec, lp.k_scale, lp.k_zero, ksz), spec.kv_bits)
    v = dequantize_kv(vc, *_kv_qparams(spec, lp.v_scale, lp.v_zero, vsz), spec.kv_bits)
    if spec.flat:
        k, v = flat.kv_back(lp.flat, k, v, spec.kv_original_space)
    if spec.prefix_len:
        k = jnp.concatenate([jnp.broadcast_to(pk[None], (B,) + pk.shape), k], axis=1)
        v = jnp.concatenate([jnp.broadcast_to(pv[None], (B,) + pv.shape), v], axis=1)
    return attention(q, k.astype(q.dtype), v.astype(q.dtype), spec.prefix_len + row, spec.config.num_kv_heads)


def _attend_decode(spec, lp, q, kv, pk, pv, row):
    """decode_attention (or its reference) for one token q [B, 1, H, hd] (4-bit static KV): [B, 1, H * hd]."""
    B, _, H, hd = q.shape
    kc, vc = kv[:2]
    if spec.backend == "kernels":
        fn = functools.partial(decode_attention, interpret=spec.interpret)
    else:
        fn = decode_attention_ref
    lengths = jnp.full((B,), row + 1, jnp.int32)
    o = fn(q[:, 0], kc, vc, lengths, lp.k_scale, lp.k_zero, lp.v_scale, lp.v_zero,
           pk if spec.prefix_len else None, pv if spec.prefix_len else None)
    return o.reshape(B, 1, H * hd)


def layer(spec: RuntimeSpec, lp: PackedLayer, x, kv, pk, pv, row, cos, sin):
    """One decoder layer over x [B, L, D] written at cache rows row..row+L-1. kv: this layer's cache
    (k codes, v codes, k_sz, v_sz), the last two None for static KV; returns (x, kv)."""
    c = spec.config
    B, L, _ = x.shape
    H, KV, hd = c.num_heads, c.num_kv_heads, c.head_dim
    qkv = linear(spec, lp, "qkv_in", lp.qkv, rms_norm(x, lp.input_norm, c.rms_norm_eps))
    if lp.qkv_bias is not None:  # Qwen2: after the GEMM's epilogue, as the fake model adds it
        qkv = qkv + lp.qkv_bias.astype(qkv.dtype)
    q = qkv[..., :H * hd].reshape(B, L, H, hd)
    k = qkv[..., H * hd:(H + KV) * hd].reshape(B, L, KV, hd)
    v = qkv[..., (H + KV) * hd:].reshape(B, L, KV, hd)
    if lp.q_norm is not None:  # Qwen3: per-head RMSNorm before RoPE
        q, k = rms_norm(q, lp.q_norm, c.rms_norm_eps), rms_norm(k, lp.k_norm, c.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if spec.r3:
        q, k = hadamard_transform(q), hadamard_transform(k)
    if spec.flat:
        q, k = flat.qk(lp.flat, q, k, spec.kv_original_space)
    kc, ksz = _write_kv(spec, lp, "k_cache", k, lp.k_scale, lp.k_zero, kv[0], kv[2], row)
    vc, vsz = _write_kv(spec, lp, "v_cache", v, lp.v_scale, lp.v_zero, kv[1], kv[3], row)
    kv = (kc, vc, ksz, vsz)
    # the decode kernel reads int4 codes with one (scale, zero) per head and no back-mapping; the xla
    # backend decodes with the model's own attention, as the fake-quant model does (same numbers)
    kernel_ok = (spec.backend == "kernels" and spec.kv_bits == 4 and not spec.kv_dynamic
                 and not spec.kv_original_space)
    attend = _attend_decode if (L == 1 and kernel_ok) else _attend_dequantized
    a = attend(spec, lp, q, kv, pk, pv, row)
    x = x + linear(spec, lp, "o_in", lp.o, a)
    gu = linear(spec, lp, "up_gate_in", lp.gate_up, rms_norm(x, lp.post_norm, c.rms_norm_eps))
    F = gu.shape[-1] // 2
    m = jax.nn.silu(gu[..., :F]) * gu[..., F:]
    return x + linear(spec, lp, "down_in", lp.down, m, rotate=spec.r4), kv


def hidden(pm: PackedModel, tokens, cache: QuantKVCache, pos):
    """Final-normed hidden [B, L, D] of tokens [B, L] at positions pos..pos+L-1 (pos >= P: cache rows
    pos-P..) and the updated cache. L == 1 takes the decode path (decode_attention for 4-bit KV)."""
    spec = pm.spec
    L = tokens.shape[1]
    spec.config.check_length(spec.prefix_len + max(cache.rows, L))
    cos, sin = rope_tables(spec.config, pos + jnp.arange(L))
    row = pos - spec.prefix_len
    x = pm.embed[tokens]
    out = []
    for i, lp in enumerate(pm.layers):
        pk = pm.prefix_k[i] if spec.prefix_len else None
        pv = pm.prefix_v[i] if spec.prefix_len else None
        kv = (cache.k[i], cache.v[i]) + ((cache.k_sz[i], cache.v_sz[i]) if spec.kv_dynamic else (None, None))
        x, kv = layer(spec, lp, x, kv, pk, pv, row, cos, sin)
        out.append(kv)
    k, v, k_sz, v_sz = ([kv[j] for kv in out] for j in range(4))
    cache = QuantKVCache(k=k, v=v, k_sz=k_sz if spec.kv_dynamic else [], v_sz=v_sz if spec.kv_dynamic else [])
    return rms_norm(x, pm.final_norm, spec.config.rms_norm_eps), cache


def head(pm: PackedModel, h):
    """Logits float32 [..., V] (lm_head, or the tied embedding)."""
    w = pm.embed.T if pm.lm_head is None else pm.lm_head
    return jnp.dot(h, w, preferred_element_type=jnp.float32)


def forward(pm: PackedModel, tokens, cache: QuantKVCache, pos):
    """(logits f32 [B, L, V], cache) for tokens [B, L] at positions pos..pos+L-1 (cache rows pos-P..)."""
    h, cache = hidden(pm, tokens, cache, pos)
    return head(pm, h), cache


hidden_jit = jax.jit(hidden)
hidden_jit_donating = jax.jit(hidden, donate_argnums=(2,))
head_jit = jax.jit(head)


def prefill(pm: PackedModel, tokens, rows: int | None = None):
    """Tokens [B, L] behind the prefix (positions P..P+L-1): (logits f32 [B, L, V], a fresh cache of
    max(rows, L) rows (kernels backend: rounded up by cache_rows) with rows 0..L-1 written). Jitted per
    shape (hidden and head)."""
    B, L = tokens.shape
    h, cache = hidden_jit(pm, tokens, empty_cache(pm, B, max(rows or L, L)), pm.spec.prefix_len)
    return head_jit(pm, h), cache


def decode_step(pm: PackedModel, token, cache: QuantKVCache, pos):
    """One token [B, 1] at position `pos` (cache row pos - P) after positions 0..pos-1: (logits f32 [B, 1, V],
    cache). The given cache is donated (do not reuse it)."""
    h, cache = hidden_jit_donating(pm, token, cache, pos)
    return head_jit(pm, h), cache
