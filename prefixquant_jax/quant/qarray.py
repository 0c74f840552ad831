"""QArray: the one quantized-array type, for weights, activations, the runtime and checkpoints.

    x ~ dequantize(q) = (q.qvalue - q.zero_point) * q.scale

qvalue holds the integer codes: int8 (one code per element, or two 4-bit codes per byte along
`packed_axis`, the pallas_kernels.int4 layout), or integer-valued float32 inside a differentiable
fake quantizer (`quantize(..., ste=True)`: the rounding passes gradients straight through). scale and
zero_point broadcast against the codes in their *grouped* view (granularity "group": [..., C/g, g]);
zero_point is None for symmetric quantizers. bits, packed_axis, granularity and group_size are static.

`quantize` is the only encoder of the project: the fake-quantized model (`fake_quant`), the packed
integer runtime (runtime/pack.py) and the saved checkpoint (checkpoint/codec.py) all take their codes
from it, so they agree bit for bit. EPS is the one scale floor (the Pallas kernels' own, which must
match it).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.int4 import pack_int4, unpack_int4
from pallas_kernels.rotate_quant import EPS
from prefixquant_jax.quant.spec import QuantSpec

__all__ = ["EPS", "QArray", "concatenate", "dequantize", "dynamic_qparams", "fake_quant", "minmax",
           "qparams_from_range", "quantize", "quantize_int", "ste_round"]


def ste_round(x):
    """round(x) forward, identity gradient (straight-through estimator). Exact: x + (round(x) - x)
    == round(x) in floating point (the difference is exact by Sterbenz's lemma)."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    """Integer codes with their scale and zero point (module docstring)."""

    qvalue: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    bits: int = dataclasses.field(metadata={"static": True})
    granularity: str = dataclasses.field(default="tensor", metadata={"static": True})
    group_size: int | None = dataclasses.field(default=None, metadata={"static": True})
    packed_axis: int | None = dataclasses.field(default=None, metadata={"static": True})

    @property
    def codes(self) -> jax.Array:
        """The codes one per element, in the logical shape (unpacked)."""
        if self.packed_axis is None:
            return self.qvalue
        return unpack_int4(self.qvalue, axis=self.packed_axis)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape) if self.packed_axis is not None else tuple(self.qvalue.shape)

    def pack(self, axis: int = -1) -> "QArray":
        """Two 4-bit codes per int8 byte along `axis` (even length); 8-bit codes stay one per byte."""
        if self.packed_axis is not None or self.bits != 4:
            return self
        if self.zero_point is not None:
            raise ValueError("int4 packing holds symmetric codes (-8..7); this QArray has a zero point")
        axis = axis % self.qvalue.ndim
        return dataclasses.replace(self, qvalue=pack_int4(self.qvalue.astype(jnp.int8), axis=axis), packed_axis=axis)

    def unpack(self) -> "QArray":
        return dataclasses.replace(self, qvalue=self.codes, packed_axis=None)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self, dtype)


def _grouped(x, granularity: str, group_size: int | None):
    """[..., C] -> [..., C/g, g] for group granularity (the view scales broadcast against)."""
    if granularity != "group":
        return x
    C = x.shape[-1]
    if C % group_size:
        raise ValueError(f"channels {C} not divisible by group_size {group_size}")
    return x.reshape(*x.shape[:-1], C // group_size, group_size)


def grouped(x, spec: QuantSpec):
    """x in the view its scales broadcast against ([..., C/g, g] for group granularity)."""
    return _grouped(x, spec.granularity, spec.group_size)


def reduce_axes(ndim: int, granularity: str) -> tuple[int, ...]:
    """Axes reduced to one statistic for an array of `ndim` dims (after the group reshape)."""
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
    """(min, max) over the granularity's axes, keepdims, in fp32 (grouped view)."""
    xg = grouped(x.astype(jnp.float32), spec)
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
    """(scale, zero) of a dynamic quantizer from x itself (no gradient through the range)."""
    lo, hi = minmax(jax.lax.stop_gradient(x), spec)
    return qparams_from_range(lo, hi, spec, spec.clip_ratio if clip is None else clip)


def quantize_int(x, scale, zero, spec: QuantSpec):
    """Integer codes (integer-valued float32, straight-through) clip(round(x / scale) + zero); x grouped."""
    return jnp.clip(ste_round(x / scale) + zero, spec.qmin, spec.qmax)


def from_codes(q, scale, zero, spec: QuantSpec, shape, ste: bool) -> QArray:
    """A QArray of float codes q (grouped view) as quantize returns it: int codes unless `ste`."""
    q = q.reshape(shape)
    if not ste:
        q = q.astype(jnp.int8 if spec.symmetric else jnp.uint8)
    return QArray(qvalue=q, scale=scale, zero_point=None if spec.symmetric else zero, bits=spec.bits,
                  granularity=spec.granularity, group_size=spec.group_size)


def dequantize(q: QArray, dtype=jnp.float32) -> jax.Array:
    """(codes - zero_point) * scale in float32, then cast to `dtype`, in the codes' logical shape."""
    codes = q.codes
    c = _grouped(codes.astype(jnp.float32), q.granularity, q.group_size)
    y = (c - (0.0 if q.zero_point is None else q.zero_point)) * q.scale
    return y.reshape(codes.shape).astype(dtype)


def quantize(x, spec: QuantSpec, scale=None, zero=None, clip=None, *, ste: bool = False) -> QArray:
    """QArray of x under `spec`. Dynamic specs compute (scale, zero) from x (times `clip`, default
    spec.clip_ratio) and ignore `scale`; static specs need `scale` (and `zero` if asymmetric; a trained
    zero point is rounded to an integer code). Scales are floored at EPS. ste=False: int8 codes
    (uint8 for asymmetric specs, codes 0..2^b - 1); ste=True: integer-valued float32 codes with straight-through rounding (for `fake_quant`)."""
    xf = grouped(x.astype(jnp.float32), spec)
    if spec.dynamic:
        scale, zero = dynamic_qparams(x.astype(jnp.float32), spec, clip)
    else:
        if scale is None:
            raise ValueError("static quantizer called without a scale")
        scale = jnp.maximum(jnp.asarray(scale).astype(jnp.float32), EPS)
        zero = jnp.zeros((), jnp.float32) if (zero is None or spec.symmetric) else ste_round(
            jnp.asarray(zero).astype(jnp.float32))
    return from_codes(quantize_int(xf, scale, zero, spec), scale, zero, spec, x.shape, ste)


def fake_quant(x, spec: QuantSpec, scale=None, zero=None, clip=None):
    """dequantize(quantize(x)) in x's dtype, differentiable: straight-through for x and the LSQ-style
    gradient for a static `scale` (the rounding is the only non-differentiable step)."""
    return dequantize(quantize(x, spec, scale, zero, clip, ste=True), x.dtype)


def concatenate(qs: list[QArray], axis: int) -> QArray:
    """One QArray of several along `axis` (e.g. q|k|v kernels along `out`): codes and per-channel scales
    are concatenated as they are, never re-quantized. They must share bits, granularity and packing,
    and their scales must vary along `axis` (per-channel along `out`) or be equal."""
    first = qs[0]
    if any((q.bits, q.granularity, q.group_size, q.packed_axis) != (first.bits, first.granularity, first.group_size,
                                                                     first.packed_axis) for q in qs):
        raise ValueError("concatenate: QArrays differ in bits, granularity or packing")
    cat = lambda arrs: jnp.concatenate(arrs, axis=axis)
    return dataclasses.replace(first, qvalue=cat([q.qvalue for q in qs]), scale=cat([q.scale for q in qs]),
                               zero_point=None if first.zero_point is None else cat([q.zero_point for q in qs]))
