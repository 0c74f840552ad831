"""Data-aware clip searches (pure jnp): each picks, per channel or per head, the clip ratio from a grid that
minimises an output error on calibration data, rather than the quantized tensor's own error.

* `output_aware_weight_clip`: per output channel of a kernel W [in, out], the ratio minimising
  ||X W - X Q_r(W)||^2 over the linear's calibration inputs X, computed from the input Gram matrix
  G = X^T X as sum_i (E^T G E)_cc with E = W - Q_r(W) (AWQ's auto-clip, PrefixQuant's
  `weight_layer_mse_init`). Exact, and cheaper than running X when tokens outnumber input channels.
* `head_clip_reconstruction`: per KV head, the ratio minimising ||V - Q_r(V)||^2 (static per-head spec).
* `head_clip_attention`: per KV head, the ratio minimising the squared error of the attention
  probabilities softmax(q k^T / sqrt(d)) when K is quantized, behind an FP prefix whose keys stay FP.
  What matters about K is the attention it produces, not the keys themselves.

All return ratios with the spec's keepdims shape ([1, out] per channel, [KV, 1] per head) and the
per-candidate errors, so callers can report what the search saw.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from prefixquant_jax.quant.qarray import fake_quant, minmax, qparams_from_range
from prefixquant_jax.quant.spec import QuantSpec


def _dequant(x, scale, zero, spec: QuantSpec):
    """x through the static quantizer (scale, zero): the one encoder, quant/qarray.py."""
    return fake_quant(x, spec.replace(dynamic=False), scale, zero)


def _pick(ratios, errs):
    """errs [R, ...] -> ratios[argmin] with the trailing shape (first minimum wins, so ties keep larger r)."""
    return jnp.asarray(ratios, jnp.float32)[jnp.argmin(errs, axis=0)]


def output_aware_weight_clip(kernel, gram, spec: QuantSpec, ratios):
    """(ratio [1, out], errs [R, out]) for a per-channel weight spec: errs[r, c] = e_c^T G e_c with
    e = W - Q_r(W) (W [in, out], G [in, in] the input Gram matrix)."""
    if spec.granularity != "channel":
        raise ValueError(f"output-aware weight clip needs a per-channel spec, got {spec.granularity}")
    return _output_aware(jnp.asarray(kernel, jnp.float32), jnp.asarray(gram, jnp.float32),
                         jnp.asarray(ratios, jnp.float32), spec)


def _output_aware_impl(w, g, ratios, spec: QuantSpec):
    lo, hi = minmax(w, spec)

    def err(r):
        s, z = qparams_from_range(lo, hi, spec, r)
        e = w - _dequant(w, s, z, spec)
        return jnp.sum(e * (g @ e), axis=0)

    errs = jax.lax.map(err, ratios)  # [R, out]
    return _pick(ratios, errs)[None, :], errs


_output_aware = jax.jit(_output_aware_impl, static_argnums=3)


def _head_range(x, spec):
    lo, hi = minmax(x, spec)  # keepdims [1, 1, KV, 1]
    return lo.reshape(-1, 1), hi.reshape(-1, 1)


def head_clip_reconstruction(x, spec: QuantSpec, ratios, lo=None, hi=None):
    """(ratio [KV, 1], errs [R, KV]): per head, the ratio minimising the mean ||x - Q_r(x)||^2 of
    x [N, L, KV, hd] under a static per-head spec with range (lo, hi) [KV, 1] (default: x's own)."""
    if spec.granularity != "head":
        raise ValueError(f"per-head clip needs a per-head spec, got {spec.granularity}")
    x = jnp.asarray(x, jnp.float32)
    if lo is None:
        lo, hi = _head_range(x, spec)
    return _recon(x, jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32), jnp.asarray(ratios, jnp.float32),
                  spec)


def _recon_impl(x, lo, hi, ratios, spec):
    def err(r):
        s, z = qparams_from_range(lo, hi, spec, r)
        return jnp.mean((x - _dequant(x, s, z, spec)) ** 2, axis=(0, 1, 3))

    errs = jax.lax.map(err, ratios)  # [R, KV]
    return _pick(ratios, errs)[:, None], errs


_recon = jax.jit(_recon_impl, static_argnums=4)


def attention_probs(q, k, prefix_k=None):
    """softmax(q k^T / sqrt(hd)) per query head, causal, keys = [prefix_k; k].

    q [N, L, H, hd] at positions P..P+L-1, k [N, L, KV, hd], prefix_k [P, KV, hd] or None (P = 0);
    H = g * KV (grouped-query). Returns [N, H, L, P + L] in float32."""
    N, L, H, hd = q.shape
    KV = k.shape[2]
    if prefix_k is not None:
        k = jnp.concatenate([jnp.broadcast_to(prefix_k[None], (N,) + prefix_k.shape).astype(k.dtype), k], axis=1)
    P = k.shape[1] - L
    kh = jnp.repeat(k, H // KV, axis=2)
    s = jnp.einsum("nlhd,nthd->nhlt", q, kh) / np.sqrt(hd)
    visible = jnp.arange(P + L)[None, :] <= (P + jnp.arange(L))[:, None]
    return jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)


def head_clip_attention(q, k, spec: QuantSpec, ratios, prefix_k=None, lo=None, hi=None):
    """(ratio [KV, 1], errs [R, KV]): per KV head, the ratio whose quantized K (static per-head spec,
    range (lo, hi) [KV, 1], default k's own) gives attention probabilities closest (mean squared error over
    that head's query group) to those of the FP k. The prefix keys stay FP, as in the model."""
    if spec.granularity != "head":
        raise ValueError(f"per-head clip needs a per-head spec, got {spec.granularity}")
    q, k = jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)
    if lo is None:
        lo, hi = _head_range(k, spec)
    pk = None if prefix_k is None else jnp.asarray(prefix_k, jnp.float32)
    return _attn(q, k, pk, jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32),
                 jnp.asarray(ratios, jnp.float32), spec)


def _attn_impl(q, k, pk, lo, hi, ratios, spec):
    KV, H = k.shape[2], q.shape[2]
    ref = attention_probs(q, k, pk)

    def err(r):
        s, z = qparams_from_range(lo, hi, spec, r)
        kq = _dequant(k, s, z, spec)
        d = (attention_probs(q, kq, pk) - ref) ** 2  # [N, H, L, T]
        return d.reshape(d.shape[0], KV, H // KV, *d.shape[2:]).mean(axis=(0, 2, 3, 4))

    errs = jax.lax.map(err, ratios)  # [R, KV]
    return _pick(ratios, errs)[:, None], errs


_attn = jax.jit(_attn_impl, static_argnums=6)
