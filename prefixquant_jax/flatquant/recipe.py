"""FlatQuantRecipe: transform, then quantize, at each named site; transformed + clipped kernels.

The recipe is static (frozen, JSON-able); every number lives in the block: `block.transforms`
(TransformParam / ClipParam, see transforms.py) and `block.qparams` (static scales; after the merge
also the weight scales qparams[<linear>]["scale"]). `merged` (set by merge.py) says the kernels already hold the
offline part:

* merged: a kernel is fake-quantized with its scale `qparams[<linear>]["scale"]` (exactly as QuantRecipe
  does), or used as is without weight quantization; before the merge the forward builds it from the FP kernel:
  W' = P^-1 diag(1/s) W (v: then times P_v per KV head; o: (P_o kron P_v)^-1 W), clamps each output
  channel to [sigmoid(a_min) min, sigmoid(a_max) max] (LWC) and fake-quantizes it with the scale of that
  clamped column (per-channel symmetric RTN);
* a site applies the online part of its transform ((x * s) (P1 kron P2); s only while it exists: the
  merge folds it into a norm or the up kernel and deletes it), then quantizes: dynamic specs with the
  site's LAC clip factors sigmoid(a_min), sigmoid(a_max) on the per-token range; static specs with
  `qparams[site]` (scale, zero point: grid-searched by calibrate.py, then trained).

K and V (`kv_original_space`): False (FlatQuant's layout) caches codes of k P_k and v P_v, q gets
P_k^-T and the o site mixes heads only (P_v^-1 sits in the o kernel). True (for an FP prefix, whose KV
the FP model computes in the original space) caches the dequantized values mapped back, Q(k P_k) P_k^-1
and Q(v P_v) P_v^-1, and the o site applies P_o kron P_v: the same function, up to fp rounding.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from prefixquant_jax.flatquant.transforms import factor, factors, kron_apply, kron_left
from prefixquant_jax.quant.qarray import (EPS, QArray, fake_quant, from_codes, grouped, minmax, qparams_from_range,
                                          quantize, quantize_int, ste_round)
from prefixquant_jax.quant.recipe import hands_qact, static_qparams, weight_parts
from prefixquant_jax.quant.spec import QuantSpec

SITE_TRANSFORM = {"qkv_in": "qkv", "up_gate_in": "ug", "down_in": "down"}
INPUT_TRANSFORM = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "ug", "up": "ug", "down": "down"}


def lac_qparams(xf, spec: QuantSpec, a_min, a_max):
    """(scale, zero) of float32 xf for a dynamic spec whose range (per spec granularity, keepdims) is shrunk
    by sigmoid(a_min) below 0 and sigmoid(a_max) above 0. The int4 runtime calls this too (same codes)."""
    lo, hi = minmax(xf, spec)
    lo = jnp.minimum(lo, 0.0) * jax.nn.sigmoid(a_min)
    hi = jnp.maximum(hi, 0.0) * jax.nn.sigmoid(a_max)
    if spec.symmetric:
        return jnp.maximum(jnp.maximum(-lo, hi) / spec.sym_divisor, EPS), jnp.zeros((), jnp.float32)
    scale = jnp.maximum((hi - lo) / (spec.qmax - spec.qmin), EPS)
    return scale, ste_round(-lo / scale)


def lac_fake_quant(x, spec: QuantSpec, a_min, a_max):
    """Dynamic fake-quantization whose per-token range is shrunk by sigmoid(a_min) (below 0) and
    sigmoid(a_max) (above 0): learnable activation clipping. Gradients reach a_min / a_max via the scale."""
    return lac_quantize(x, spec, a_min, a_max).dequantize(x.dtype)


def lac_quantize(x, spec: QuantSpec, a_min, a_max, ste: bool = True) -> QArray:
    """The QArray of x under the LAC-shrunk dynamic range (straight-through float codes, or int codes
    with ste=False: the int4 runtime's)."""
    xf = grouped(x.astype(jnp.float32), spec)
    scale, zero = lac_qparams(x.astype(jnp.float32), spec, a_min, a_max)
    return from_codes(quantize_int(xf, scale, zero, spec), scale, zero, spec, x.shape, ste)


def mix_heads(x, po):
    """x [..., H * hd] with its heads mixed by po [H, H] (x @ (po kron I_hd)), fp32 inside."""
    H = po.shape[0]
    xr = x.astype(jnp.float32).reshape(*x.shape[:-1], H, x.shape[-1] // H)
    return jnp.einsum("ik,...id->...kd", po, xr).reshape(x.shape).astype(x.dtype)


def per_head(x, m):
    """x [..., hd] @ m [hd, hd]."""
    return jnp.einsum("...d,de->...e", x.astype(jnp.float32), m).astype(x.dtype)


def offline_kernel(t, name: str, kernel, param: str):
    """The kernel [in, out] of linear `name` with the block's transforms folded in (no clipping)."""
    k = kernel.astype(jnp.float32)
    tn = INPUT_TRANSFORM.get(name)
    if tn is not None and f"{tn}_s" in t:
        k = k / t[f"{tn}_s"][...][:, None]
    fs = factors(t, tn, param) if tn is not None else []
    if len(fs) == 2:
        k = kron_left(fs[0][1], fs[1][1], k)
    if name == "v" and factors(t, "v", param):
        pv = factor(t, "v_1", param)[0]
        hd = pv.shape[0]
        k = jnp.einsum("ihd,de->ihe", k.reshape(k.shape[0], -1, hd), pv).reshape(k.shape)
    if name == "o" and factors(t, "o", param):
        po_inv = factor(t, "o_1", param)[1]
        fv = factors(t, "v", param)
        hd = k.shape[0] // po_inv.shape[0]
        pv_inv = fv[0][1] if fv else jnp.eye(hd, dtype=jnp.float32)
        k = kron_left(po_inv, pv_inv, k)
    return k


def transformed_bias(t, name: str, bias, param: str):
    """Bias [out] of linear `name` with the block's output-side transform: v -> b_v P_v per KV head."""
    if name != "v" or not factors(t, "v", param):
        return bias
    pv = factor(t, "v_1", param)[0]
    b = bias.astype(jnp.float32).reshape(-1, pv.shape[0])
    return (b @ pv).reshape(bias.shape).astype(bias.dtype)


def lwc_clip(k, t, name: str):
    """Clamp each output channel of k [in, out] to [sigmoid(a_min) * min, sigmoid(a_max) * max] (LWC)."""
    if f"lwc_{name}_max" not in t:
        return k
    lo = k.min(axis=0, keepdims=True) * jax.nn.sigmoid(t[f"lwc_{name}_min"][...])
    hi = k.max(axis=0, keepdims=True) * jax.nn.sigmoid(t[f"lwc_{name}_max"][...])
    return jnp.clip(k, lo, hi)


def channel_scale(k, spec: QuantSpec):
    """Per-output-channel symmetric RTN scale [1, out] of k [in, out] (full range of the clamped kernel)."""
    lo, hi = minmax(k, spec)
    return qparams_from_range(lo, hi, spec, 1.0)[0]


def quantizable_kernel(t, name: str, kernel, param: str):
    """What the weight quantizer sees: transformed, then LWC-clamped (the merge stores exactly this)."""
    return lwc_clip(offline_kernel(t, name, kernel, param), t, name)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlatQuantRecipe:
    """`sites`/`weight` as in QuantRecipe (weight: per-channel symmetric, static). `param`: "inverse" (P
    stored, P^-1 = inv(P) in fp32) or "orthogonal" (U diag(sigma) V^T, Cayley). Wrapped in quant.recipe.Capture,
    a site's statistics are those of its input after the transform (`site_input`)."""

    sites: tuple[tuple[str, QuantSpec], ...] = ()
    weight: QuantSpec | None = None
    param: str = "inverse"
    kv_original_space: bool = False
    merged: bool = False
    int_matmul: bool = False  # merged models: linears as the integer runtime computes them (quant/int_matmul.py)

    def spec(self, site: str) -> QuantSpec | None:
        return dict(self.sites).get(site)

    def replace(self, **kw) -> "FlatQuantRecipe":
        return dataclasses.replace(self, **kw)

    def _has(self, t, name: str) -> bool:
        return f"{name}_1" in t or f"{name}_1_base" in t

    def _transform(self, name: str, x, t):
        tn = SITE_TRANSFORM.get(name)
        if tn is not None and self._has(t, tn):
            if f"{tn}_s" in t:
                x = (x.astype(jnp.float32) * t[f"{tn}_s"][...]).astype(x.dtype)
            (p1, _), (p2, _) = factors(t, tn, self.param)
            return kron_apply(x, p1, p2)
        if name == "o_in" and self._has(t, "o"):
            po = factor(t, "o_1", self.param)[0]
            if self.kv_original_space and self._has(t, "v"):
                return kron_apply(x, po, factor(t, "v_1", self.param)[0])
            return mix_heads(x, po)  # values are cached as v P_v already: mix heads only (P_o kron I)
        if name == "k_cache" and self._has(t, "k"):
            return per_head(x, factor(t, "k_1", self.param)[0])
        return x

    def _quantize(self, name: str, x, qparams, t):
        spec = self.spec(name)
        if spec is None:
            return x
        if self.merged and hands_qact(self, name, spec):
            if spec.dynamic and f"lac_{name}_max" in t:
                return lac_quantize(x, spec, t[f"lac_{name}_min"][...], t[f"lac_{name}_max"][...])
            return quantize(x, spec, scale=None if spec.dynamic else static_qparams(qparams, name)[0], ste=True)
        if spec.dynamic:
            if f"lac_{name}_max" in t:
                return lac_fake_quant(x, spec, t[f"lac_{name}_min"][...], t[f"lac_{name}_max"][...])
            return fake_quant(x, spec)
        scale, zero = static_qparams(qparams, name)
        return fake_quant(x, spec, scale=scale, zero=zero)

    def apply_site(self, name: str, x, qparams, block=None):
        t = block.transforms
        if name == "q_rot":  # q P_k^-T keeps q . k: (q P^-T)(k P)^T = q k^T
            if self.kv_original_space or not self._has(t, "k"):
                return x
            return per_head(x, factor(t, "k_1", self.param)[1].T)
        if name in ("k_rot", "down_rot"):
            return x
        return self.site_output(name, self.site_input(name, x, qparams, block), qparams, block)

    def site_input(self, name: str, x, qparams, block=None):
        """What the quantizer of site `name` sees: x after the site's transform."""
        return self._transform(name, x, block.transforms)

    def site_output(self, name: str, x, qparams, block=None):
        """The quantizer of site `name` on its transformed input (and, KV in the original space, back)."""
        t = block.transforms
        x = self._quantize(name, x, qparams, t)
        if self.kv_original_space and name in ("k_cache", "v_cache") and self._has(t, name[0]):
            x = per_head(x, factor(t, name[0] + "_1", self.param)[1])
        return x

    def apply_bias(self, name: str, bias, block=None):
        """The bias of linear `name` as the forward adds it: before the merge, v's bias times P_v per KV head
        (the v kernel's output side, offline_kernel); input-side transforms leave a bias alone. The merge
        stores exactly this (merge.py)."""
        if self.merged or name != "v" or block is None:
            return bias
        return transformed_bias(block.transforms, name, bias, self.param)

    def weight_parts(self, name: str, kernel, qparams):
        """As QuantRecipe.weight_parts, for a merged model (before the merge the kernels are not yet quantizable)."""
        return weight_parts(self.weight, name, kernel, qparams) if self.merged else None

    def apply_weight(self, name: str, kernel, qparams, block=None):
        if self.merged:  # the kernel holds the transforms and the clipping
            if self.weight is None or name not in qparams:
                return kernel
            return fake_quant(kernel, self.weight, scale=static_qparams(qparams, name)[0])
        if block is None:
            raise ValueError("FlatQuantRecipe.apply_weight needs the block (its transforms)")
        t = block.transforms
        if self.weight is None:
            return offline_kernel(t, name, kernel, self.param).astype(kernel.dtype)
        k = quantizable_kernel(t, name, kernel, self.param)
        return fake_quant(k, self.weight, scale=channel_scale(k, self.weight)).astype(kernel.dtype)
