"""Pure fake-quantization functions (jit-able, fp32 and bf16 safe, straight-through rounding).

All math runs in fp32 and the result is cast back to x's dtype. Scales broadcast against x as the
granularity in `QuantSpec` describes; a static scale is any array of that broadcast shape.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from prefixquant_jax.quant.spec import QuantSpec

EPS = 1e-8


def ste_round(x):
    """round(x) forward, identity gradient (straight-through estimator)."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def _grouped(x, spec: QuantSpec):
    """Reshape for group granularity: [..., C] -> [..., C/g, g]."""
    if spec.granularity != "group":
        return x
    C = x.shape[-1]
    if C % spec.group_size:
        raise ValueError(f"channels {C} not divisible by group_size {spec.group_size}")
    return x.reshape(*x.shape[:-1], C // spec.group_size, spec.group_size)


def reduce_axes(ndim: int, granularity: str) -> tuple[int, ...]:
    """Axes reduced to one statistic for an array of `ndim` dims (after group reshape)."""
    if granularity == "tensor":
        return tuple(range(ndim))
    if granularity == "channel":
        return tuple(range(ndim - 1))
    if granularity in ("token", "group"):
        return (ndim - 1,)
    if granularity == "head":
        return tuple(a for a in range(ndim) if a != ndim - 2)
    raise ValueError(granularity)


def minmax(x, spec: QuantSpec):
    """(min, max) over the granularity's axes, keepdims, in fp32 (before any group reshape undo)."""
    xg = _grouped(x.astype(jnp.float32), spec)
    axes = reduce_axes(xg.ndim, spec.granularity)
    return xg.min(axis=axes, keepdims=True), xg.max(axis=axes, keepdims=True)


def qparams_from_range(lo, hi, spec: QuantSpec, clip=1.0):
    """(scale, zero) from a value range, shrunk by `clip` (a float or a broadcastable array)."""
    if spec.symmetric:
        amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) * clip
        return jnp.maximum(amax / spec.sym_divisor, EPS), jnp.zeros_like(amax)
    lo, hi = jnp.minimum(lo, 0.0) * clip, jnp.maximum(hi, 0.0) * clip
    scale = jnp.maximum((hi - lo) / (spec.qmax - spec.qmin), EPS)
    zero = jnp.round(-lo / scale)
    return scale, zero


def dynamic_qparams(x, spec: QuantSpec, clip=None):
    lo, hi = minmax(jax.lax.stop_gradient(x), spec)
    return qparams_from_range(lo, hi, spec, spec.clip_ratio if clip is None else clip)


def quantize_int(x, scale, zero, spec: QuantSpec):
    """Integer codes (as float) clamp(round(x/scale) + zero); x already grouped if needed."""
    return jnp.clip(ste_round(x / scale) + zero, spec.qmin, spec.qmax)


def fake_quant(x, spec: QuantSpec, scale=None, zero=None, clip=None):
    """Quantize-dequantize x. Dynamic specs ignore `scale`; static specs need it (zero: asymmetric only).

    Gradients: straight-through for x, and the usual LSQ-style gradient for `scale` (the rounding is
    the only non-differentiable step), so static scales can be trained.
    """
    return fake_quant_parts(x, spec, scale, zero, clip)[0]


def fake_quant_parts(x, spec: QuantSpec, scale=None, zero=None, clip=None):
    """(fake_quant(x), codes q, scale, zero): y = ((q - zero) * scale) in x's dtype and shape, with q
    (integer-valued float32), scale and zero as they broadcast against x (granularity 'group': against
    the grouped view [..., C/g, g])."""
    dtype = x.dtype
    xf = _grouped(x.astype(jnp.float32), spec)
    if spec.dynamic:
        scale, zero = dynamic_qparams(x.astype(jnp.float32), spec, clip)
    else:
        if scale is None:
            raise ValueError("static quantizer called without a scale")
        scale = jnp.maximum(scale.astype(jnp.float32), EPS)
        # a trained zero point must stay an integer code: STE-round it
        zero = jnp.zeros((), jnp.float32) if (zero is None or spec.symmetric) else ste_round(zero.astype(jnp.float32))
    q = quantize_int(xf, scale, zero, spec)
    y = (q - zero) * scale
    return y.reshape(x.shape).astype(dtype), q, scale, zero


def mse_clip_search(x, spec: QuantSpec, ratios) -> jnp.ndarray:
    """Per-group best clip ratio from `ratios` [R] minimizing ||x - Q(x)||^2 (dynamic-style ranges).

    Returns the chosen ratio with the granularity's keepdims shape. Used for RTN weight clipping.
    """
    lo, hi = minmax(x, spec)
    xg = _grouped(x.astype(jnp.float32), spec)
    axes = reduce_axes(xg.ndim, spec.granularity)

    def err(r):
        s, z = qparams_from_range(lo, hi, spec, r)
        y = (jnp.clip(jnp.round(xg / s) + z, spec.qmin, spec.qmax) - z) * s
        return ((y - xg) ** 2).sum(axis=axes, keepdims=True)

    errs = jax.lax.map(err, jnp.asarray(ratios, jnp.float32))  # [R, ...keepdims]
    return jnp.asarray(ratios, jnp.float32)[jnp.argmin(errs, axis=0)]


def weight_scale(w, spec: QuantSpec, ratios):
    """Static symmetric scale of kernel w [in, out] per spec granularity ([1, out] per channel), with the
    clip ratio from `ratios` that minimises the channel's squared quantization error (RTN init)."""
    lo, hi = minmax(w, spec)
    return qparams_from_range(lo, hi, spec, mse_clip_search(w, spec, ratios))[0]


def quantize_weight(w, spec: QuantSpec, ratios=None):
    """RTN fake-quantized kernel [in, out] (per output channel for 'channel'), with MSE-searched clip."""
    if ratios is None:
        return fake_quant(w, spec.replace(dynamic=True))
    clip = mse_clip_search(w, spec, ratios)
    return fake_quant(w, spec.replace(dynamic=True), clip=clip)
