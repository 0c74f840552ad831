"""FlatQuantRecipe: transform, then quantize, at each named site; transformed + clipped kernels.

A QuantRecipe (quant/recipe.py) whose method is FlatQuant's. Every number lives in the block: `block.transforms`
(typed variables keyed by site or linear, transforms.py) and `block.qparams` (static scales; after the merge also
the weight scales qparams[<linear>]["scale"]). `merged` (set by merge.py) says the kernels already hold the
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

K and V: without a prefix (FlatQuant's layout) the cache holds codes of k P_k and v P_v, q gets P_k^-T and the
o site mixes heads only (P_v^-1 sits in the o kernel). With the FP prefix (`prefix`), whose K/V the FP model
computes in the original space, the cache holds the dequantized values mapped back, Q(k P_k) P_k^-1 and
Q(v P_v) P_v^-1 (`kv_back`), and the o site applies P_o kron P_v: the same function, up to fp rounding.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import ClassVar

import jax
import jax.numpy as jnp

from prefixquant_jax.errors import UserError
from prefixquant_jax.flatquant.transforms import (KRON_SITES, PARAMS, factor, factors, has_transform, kron_apply,
                                                  kron_left, shuffle_rows)
from prefixquant_jax.quant.qarray import (EPS, QArray, fake_quant, from_codes, grouped, minmax, qparams_from_range,
                                          quantize, quantize_int, ste_round)
from prefixquant_jax.quant.recipe import QuantRecipe, hands_qact, static_qparams, weight_parts
from prefixquant_jax.quant.spec import QuantSpec

KRON_OF = {"q": "qkv_in", "k": "qkv_in", "v": "qkv_in", "gate": "up_gate_in", "up": "up_gate_in", "down": "down_in"}


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


def lac_logits(t, site: str):
    """(a_min, a_max) arrays of the site's LAC, or None."""
    if site in t and "clip_max" in t[site]:
        return t[site]["clip_min"][...], t[site]["clip_max"][...]
    return None


def mix_heads(x, po):
    """x [..., H * hd] with its heads mixed by po [H, H] (x @ (po kron I_hd)), fp32 inside: the left half of
    kron_apply."""
    H = po.shape[0]
    hd = x.shape[-1] // H
    xt = jnp.swapaxes(x.astype(jnp.float32).reshape(-1, H, hd), 1, 2).reshape(-1, H) @ po.astype(jnp.float32)
    return jnp.swapaxes(xt.reshape(-1, hd, H), 1, 2).reshape(x.shape).astype(x.dtype)


def per_head(x, m):
    """x [..., hd] @ m [hd, hd]."""
    return jnp.einsum("...d,de->...e", x.astype(jnp.float32), m).astype(x.dtype)


def input_side(t, site: str | None, kernel, param: str, shuffled: bool = False):
    """kernel [in, out] with the inverse of the input-side transform of `site` folded in: diag(1/s), then
    (P1 kron P2)^-1 (rows); `shuffled`: its rows then in the order of kron_apply(shuffled=True)."""
    k = kernel.astype(jnp.float32)
    if site is not None and site in t and "smooth" in t[site]:
        k = k / t[site]["smooth"][...][:, None]
    fs = factors(t, site, param) if site is not None else []
    if len(fs) == 2:
        k = kron_left(fs[0][1], fs[1][1], k)
        if shuffled:
            k = shuffle_rows(k, fs[0][1].shape[0], fs[1][1].shape[0])
    return k


def output_side(t, name: str, k, param: str):
    """k with the output-side transform of linear `name` folded in: v -> v P_v per KV head; o -> (P_o kron P_v)^-1
    on its rows (its input side: the attention output)."""
    if name == "v" and has_transform(t, "v_cache"):
        pv = factor(t["v_cache"]["left"], param)[0]
        hd = pv.shape[0]
        k = jnp.einsum("ihd,de->ihe", k.reshape(k.shape[0], -1, hd), pv).reshape(k.shape)
    if name == "o" and has_transform(t, "o_in"):
        po_inv = factor(t["o_in"]["left"], param)[1]
        hd = k.shape[0] // po_inv.shape[0]
        pv_inv = factor(t["v_cache"]["left"], param)[1] if has_transform(t, "v_cache") else jnp.eye(hd, dtype=jnp.float32)
        k = kron_left(po_inv, pv_inv, k)
    return k


def offline_kernel(t, name: str, kernel, param: str, shuffled: bool = False):
    """The kernel [in, out] of linear `name` with the block's transforms folded in (no clipping)."""
    return output_side(t, name, input_side(t, KRON_OF.get(name), kernel, param, shuffled), param)


def transformed_bias(t, name: str, bias, param: str):
    """Bias [out] of linear `name` with the block's output-side transform: v -> b_v P_v per KV head."""
    if name != "v" or not has_transform(t, "v_cache"):
        return bias
    pv = factor(t["v_cache"]["left"], param)[0]
    b = bias.astype(jnp.float32).reshape(-1, pv.shape[0])
    return (b @ pv).reshape(bias.shape).astype(bias.dtype)


def lwc_clip(k, t, name: str):
    """Clamp each output channel of k [in, out] to [sigmoid(a_min) * min, sigmoid(a_max) * max] (LWC)."""
    if name not in t:
        return k
    lo = k.min(axis=0, keepdims=True) * jax.nn.sigmoid(t[name]["clip_min"][...])
    hi = k.max(axis=0, keepdims=True) * jax.nn.sigmoid(t[name]["clip_max"][...])
    return jnp.clip(k, lo, hi)


def channel_scale(k, spec: QuantSpec):
    """Per-output-channel symmetric RTN scale [1, out] of k [in, out] (full range of the clamped kernel)."""
    lo, hi = minmax(k, spec)
    return qparams_from_range(lo, hi, spec, 1.0)[0]


def quantizable_kernel(t, name: str, kernel, param: str, shuffled: bool = False):
    """What the weight quantizer sees: transformed, then LWC-clamped (the merge stores exactly this; `shuffled`:
    its rows permuted, the same per-channel clamp and scale)."""
    return lwc_clip(offline_kernel(t, name, kernel, param, shuffled), t, name)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlatQuantRecipe(QuantRecipe):
    """`param`: "inverse" (P stored, P^-1 = inv(P) in fp32) or "orthogonal" (U diag(sigma) V^T, Cayley).
    Wrapped in quant.recipe.Capture, a site's statistics are those of its input after the transform."""

    method: ClassVar[str] = "flatquant"

    param: str = "inverse"
    merged: bool = False

    def check(self) -> None:
        super().check()
        if self.rotate:
            raise UserError("a FlatQuantRecipe learns its transforms; it does not rotate (rotate=False)",
                            "QuantRecipe.rotate")
        if self.param not in PARAMS:
            raise UserError(f"FlatQuantRecipe.param must be one of {', '.join(PARAMS)}, got {self.param!r}")

    def fp_reference(self):
        return None  # the FP model has no online part: the learned transforms are FlatQuant's own

    def _transform(self, name: str, x, t):
        if name in ("qkv_in", "up_gate_in", "down_in") and has_transform(t, name):
            if "smooth" in t[name]:
                x = (x.astype(jnp.float32) * t[name]["smooth"][...]).astype(x.dtype)
            (p1, _), (p2, _) = factors(t, name, self.param)
            return kron_apply(x, p1, p2, shuffled=self.shuffled(name))
        if name == "o_in" and has_transform(t, "o_in"):
            po = factor(t["o_in"]["left"], self.param)[0]
            if self.prefix and has_transform(t, "v_cache"):
                return kron_apply(x, po, factor(t["v_cache"]["left"], self.param)[0])
            return mix_heads(x, po)  # values are cached as v P_v already: mix heads only (P_o kron I)
        if name == "k_cache" and has_transform(t, "k_cache"):
            return per_head(x, factor(t["k_cache"]["left"], self.param)[0])
        return x

    def shuffled(self, site: str | None) -> bool:
        """Whether, before the merge, the Kronecker site's transformed channels stay in kron_apply's shuffled order
        (its linears' kernel rows shuffled alike): the training forward saves a transpose each way; the quantizer
        (per token or per tensor) is blind to the order. The merged model keeps the natural order."""
        if self.merged or site not in KRON_SITES:
            return False
        spec = self.spec(site)
        return spec is None or spec.granularity in ("token", "tensor")

    def _quantize(self, name: str, x, qparams, t):
        spec = self.spec(name)
        if spec is None:
            return x
        lac = lac_logits(t, name) if spec.dynamic else None
        if self.merged and hands_qact(self, name, spec):
            if lac is not None:
                return lac_quantize(x, spec, *lac)
            return quantize(x, spec, scale=None if spec.dynamic else static_qparams(qparams, name)[0], ste=True)
        if spec.dynamic:
            return fake_quant(x, spec) if lac is None else lac_fake_quant(x, spec, *lac)
        scale, zero = static_qparams(qparams, name)
        return fake_quant(x, spec, scale=scale, zero=zero)

    def apply_site(self, name: str, x, qparams, block=None):
        t = block.transforms
        if name == "q_rot":  # q P_k^-T keeps q . k: (q P^-T)(k P)^T = q k^T
            if self.prefix or not has_transform(t, "k_cache"):
                return x
            return per_head(x, factor(t["k_cache"]["left"], self.param)[1].T)
        if name in ("k_rot", "down_rot"):
            return x
        return self.site_output(name, self.site_input(name, x, qparams, block), qparams, block)

    def site_input(self, name: str, x, qparams, block=None):
        """What the quantizer of site `name` sees: x after the site's transform."""
        return self._transform(name, x, block.transforms)

    def site_output(self, name: str, x, qparams, block=None):
        """The quantizer of site `name` on its transformed input (and, behind an FP prefix, K/V mapped back)."""
        x = self._quantize(name, x, qparams, block.transforms)
        if name in ("k_cache", "v_cache"):
            x = self.kv_back(name, x, block)
        return x

    def kv_back(self, name: str, x, block):
        """K or V as attention reads it: behind an FP prefix, mapped back to the original space by P^-1."""
        t = block.transforms
        if self.prefix and has_transform(t, name):
            x = per_head(x, factor(t[name]["left"], self.param)[1])
        return x

    def bias(self, name: str, bias, block=None):
        """Before the merge, v's bias times P_v per KV head (the v kernel's output side, offline_kernel); input-side
        transforms leave a bias alone. The merge stores exactly this (merge.py)."""
        if self.merged or name != "v" or block is None:
            return bias
        return transformed_bias(block.transforms, name, bias, self.param)

    def weight_parts(self, name: str, kernel, qparams):
        """As QuantRecipe.weight_parts, for a merged model (before the merge the kernels are not yet quantizable)."""
        return weight_parts(self.weight, name, kernel, qparams) if self.merged else None

    def products(self, names, x, block):
        """The linears `names` that read the same input x (q, k, v; gate, up), before the merge, as one product: the
        input-side transform folded into their kernels together, each one's output side and LWC, one fake-quantized
        matrix, one matmul (per output column the same numbers as one linear at a time, with one pass over the
        shared transform and its gradient). None where that does not apply (the linears then go one at a time)."""
        if self.merged or self.weight is None or isinstance(x, QArray):
            return None
        t = block.transforms
        kernels = [block.linear_module(n).kernel[...] for n in names]
        widths = [k.shape[1] for k in kernels]
        site = KRON_OF[names[0]]
        k = input_side(t, site, jnp.concatenate(kernels, axis=1), self.param, self.shuffled(site))
        parts = jnp.split(k, list(itertools.accumulate(widths))[:-1], axis=1)
        k = jnp.concatenate([lwc_clip(output_side(t, n, p, self.param), t, n) for n, p in zip(names, parts)], axis=1)
        k = fake_quant(k, self.weight, scale=channel_scale(k, self.weight)).astype(kernels[0].dtype)
        return jnp.split(x @ k, list(itertools.accumulate(widths))[:-1], axis=-1)

    def apply_weight(self, name: str, kernel, qparams, block=None):
        if self.merged:  # the kernel holds the transforms and the clipping
            return super().apply_weight(name, kernel, qparams, block)
        t = block.transforms
        shuffled = self.shuffled(KRON_OF.get(name))
        if self.weight is None:
            return offline_kernel(t, name, kernel, self.param, shuffled).astype(kernel.dtype)
        k = quantizable_kernel(t, name, kernel, self.param, shuffled)
        return fake_quant(k, self.weight, scale=channel_scale(k, self.weight)).astype(kernel.dtype)
