"""Clip searches and RTN weights over the one encoder, quant/qarray.py (whose range and rounding
functions this module re-exports for its callers).

All math runs in fp32 and the result is cast back to x's dtype. Scales broadcast against x as the
granularity in `QuantSpec` describes; a static scale is any array of that broadcast shape.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from prefixquant_jax.quant.qarray import (EPS, dynamic_qparams, fake_quant, grouped, minmax, qparams_from_range,
                                          quantize_int, reduce_axes, ste_round)
from prefixquant_jax.quant.spec import QuantSpec

__all__ = ["EPS", "dynamic_qparams", "fake_quant", "minmax", "mse_clip_search",
           "qparams_from_range", "quantize_int", "reduce_axes", "rtn_weight", "ste_round", "weight_scale"]


def mse_clip_search(x, spec: QuantSpec, ratios) -> jnp.ndarray:
    """Per-group best clip ratio from `ratios` [R] minimizing ||x - Q(x)||^2 (dynamic-style ranges).

    Returns the chosen ratio with the granularity's keepdims shape. Used for RTN weight clipping.
    """
    lo, hi = minmax(x, spec)
    xg = grouped(x.astype(jnp.float32), spec)
    axes = reduce_axes(xg.ndim, spec.granularity)

    def err(r):
        s, z = qparams_from_range(lo, hi, spec, r)
        y = grouped(fake_quant(x.astype(jnp.float32), spec.replace(dynamic=False), s, z), spec)
        return ((y - xg) ** 2).sum(axis=axes, keepdims=True)

    errs = jax.lax.map(err, jnp.asarray(ratios, jnp.float32))  # [R, ...keepdims]
    return jnp.asarray(ratios, jnp.float32)[jnp.argmin(errs, axis=0)]


def weight_scale(w, spec: QuantSpec, ratios):
    """Static symmetric scale of kernel w [in, out] per spec granularity ([1, out] per channel), with the
    clip ratio from `ratios` that minimises the channel's squared quantization error (RTN init)."""
    lo, hi = minmax(w, spec)
    return qparams_from_range(lo, hi, spec, mse_clip_search(w, spec, ratios))[0]


def rtn_weight(w, spec: QuantSpec, ratios=None):
    """RTN fake-quantized kernel [in, out] (per output channel for 'channel'), with MSE-searched clip."""
    if ratios is None:
        return fake_quant(w, spec.replace(dynamic=True))
    clip = mse_clip_search(w, spec, ratios)
    return fake_quant(w, spec.replace(dynamic=True), clip=clip)
