"""QuantRecipe: one quantization, whole: what the model does at each named site (rotate, fake-quantize), how it
quantizes its weights, whether the FP prefix goes in front, and its name. A preset (presets.py) is a named
QuantRecipe; `Capture` is a recipe around another that also records statistics.

A recipe is static (frozen, hashable): it is part of the jitted graph, while the numbers it needs (static
scales, zero points) live in each block's `qparams`, one entry per quantizer, as typed variables
(nn.variables.Scale, ZeroPoint, both QuantParam):
  qparams[site]["scale"]    Scale, broadcastable to the site's input ([1,1,1] per tensor, [KV,1] per head)
  qparams[site]["zero"]     ZeroPoint (asymmetric static sites only)
  qparams[linear]["scale"]  per-output-channel weight Scale [1, out] for linear in WEIGHT_NAMES
(`Block.set_quantizer` writes an entry, `static_qparams` reads one).
Kernels stay full precision in the model; with `weight` set, the forward fake-quantizes each kernel with its
scale (straight-through), so weights and their scales can both be trained.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from prefixquant_jax.errors import UserError
from prefixquant_jax.nn.decoder import WEIGHT_NAMES
from prefixquant_jax.quant.int_linear import exact_in_f32, int_linear
from prefixquant_jax.quant.qarray import QArray, fake_quant, quantize
from prefixquant_jax.quant.spec import QuantSpec
from prefixquant_jax.rotate.hadamard import hadamard_transform

ACT_SITES = ("qkv_in", "o_in", "up_gate_in", "down_in")
KV_SITES = ("k_cache", "v_cache")
QUANT_SITES = ACT_SITES + KV_SITES
MATMULS = ("float", "int")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRecipe:
    """`sites`: (site, QuantSpec) pairs; unnamed sites stay FP. `weight`: the static per-channel weight quantizer
    (scales in qparams[<linear>]["scale"]; a linear without one stays FP). `rotate`: PrefixQuant's Hadamard
    rotations, R1/R2 fused into the weights by the pipeline, R3 (q, k after RoPE) and R4 (down_proj input)
    online here. `prefix`: the FP prefix of outlier tokens goes in front. `matmul` "int": each quantized linear
    computed as the integer runtime does (quant/int_linear.py), the real backend's numbers exactly.
    `name` / `description`: what presets.py calls it."""

    method: ClassVar[str] = "prefixquant"

    name: str = "custom"
    description: str = ""
    sites: tuple[tuple[str, QuantSpec], ...] = ()
    weight: QuantSpec | None = None
    rotate: bool = False
    prefix: bool = True
    matmul: str = "float"

    def spec(self, site: str) -> QuantSpec | None:
        return dict(self.sites).get(site)

    def replace(self, **kw) -> "QuantRecipe":
        return dataclasses.replace(self, **kw)

    # ---- what the recipe quantizes, summarised (reports, the CLI's table, the runtime's checks)
    def _bits(self, sites) -> int | None:
        return min((s.bits for n, s in self.sites if n in sites), default=None)

    @property
    def w_bits(self) -> int | None:
        return None if self.weight is None else self.weight.bits

    @property
    def a_bits(self) -> int | None:
        return self._bits(ACT_SITES)

    @property
    def kv_bits(self) -> int | None:
        return self._bits(KV_SITES)

    @property
    def is_static(self) -> bool:
        """Whether any activation or KV quantizer is static (needs calibrated scales)."""
        return any(not s.dynamic for _, s in self.sites)

    @property
    def is_fp(self) -> bool:
        return not self.sites and self.weight is None

    def fp_reference(self):
        """The recipe of the FP model this one is measured against: the same online rotations, no quantizer
        (None when there is nothing online)."""
        return QuantRecipe(name=f"{self.name} (FP)", rotate=True, prefix=self.prefix) if self.rotate else None

    def check(self) -> None:
        """UserError unless the pipeline can initialise and calibrate this recipe: known sites, each named once;
        static activation quantizers per tensor, static KV ones per tensor or per head (dynamic ones at any
        granularity); a static symmetric per-channel weight quantizer (or none)."""
        names = [s for s, _ in self.sites]
        for site in names:
            if site not in QUANT_SITES:
                raise UserError(f"QuantRecipe.sites: unknown site {site!r} (known: {', '.join(QUANT_SITES)})",
                                "QuantRecipe.sites")
            if names.count(site) > 1:
                raise UserError(f"QuantRecipe.sites: site {site!r} is given {names.count(site)} times",
                                "QuantRecipe.sites")
        for site, spec in self.sites:
            if not isinstance(spec, QuantSpec):
                raise UserError(f"QuantRecipe.sites: {site!r} needs a QuantSpec, got {type(spec).__name__}",
                                "QuantRecipe.sites")
            allowed = ("tensor",) if site in ACT_SITES else ("tensor", "head")
            if not spec.dynamic and spec.granularity not in allowed:
                raise UserError(f"QuantRecipe.sites: static {site!r} must have granularity {' or '.join(allowed)} "
                                f"(the calibrated scales), got {spec.granularity!r}; a dynamic quantizer may use any",
                                "QuantRecipe.sites")
        w = self.weight
        if w is not None and (not isinstance(w, QuantSpec) or w.dynamic or not w.symmetric
                              or w.granularity != "channel"):
            raise UserError(f"QuantRecipe.weight must be a static symmetric per-channel QuantSpec (scales [1, out], "
                            f"RTN or GPTQ), got {w!r}", "QuantRecipe.weight")
        if self.matmul not in MATMULS:
            raise UserError(f"QuantRecipe.matmul must be one of {', '.join(MATMULS)}, got {self.matmul!r}",
                            "QuantRecipe.matmul")
        if not isinstance(self.prefix, bool) or not isinstance(self.rotate, bool):
            raise UserError(f"QuantRecipe.prefix and .rotate must be True or False, got {self.prefix!r}, "
                            f"{self.rotate!r}")

    # ---- the model's interception points (nn/decoder.py)
    def apply_site(self, name: str, x, qparams, block=None):
        if name in ("q_rot", "k_rot", "down_rot"):  # R3, R4
            return hadamard_transform(x) if self.rotate else x
        return self.site_output(name, self.site_input(name, x, qparams, block), qparams, block)

    def site_input(self, name: str, x, qparams, block=None):
        """What the quantizer of site `name` sees (here x itself): what Capture records."""
        return x

    def site_output(self, name: str, x, qparams, block=None):
        """Site `name`'s quantizer applied to its input x (identity at an unquantized site)."""
        spec = self.spec(name)
        if spec is None:
            return x
        scale, zero = (None, None) if spec.dynamic else static_qparams(qparams, name)
        if not hands_qact(self, name, spec):
            return fake_quant(x, spec, scale=scale, zero=zero)
        return quantize(x, spec, scale=scale, zero=zero, ste=True)  # the linear computes the integer product

    def product(self, name: str, x, block):
        """x @ kernel of linear `name` as this recipe quantizes it. x may be a QArray (an activation site with
        matmul "int"): then the runtime's integer product (quant/int_linear.py)."""
        k = block.linear_module(name).kernel[...]
        if isinstance(x, QArray):  # activations in the model's dtype, like the kernels
            value = x.dequantize(k.dtype)
            parts = self.weight_parts(name, k, block.qparams)
            if parts is not None:
                k_fq, qw, sw = parts
                exact = exact_in_f32(x.bits, self.weight.bits, k.shape[0])
                return int_linear(value, k_fq, x.qvalue, x.scale, qw, sw, not exact).astype(value.dtype)
            x = value
        return x @ self.apply_weight(name, k, block.qparams, block)

    def bias(self, name: str, bias, block=None):
        """The bias of linear `name` as the forward adds it (after the product)."""
        return bias

    def weight_parts(self, name: str, kernel, qparams):
        return weight_parts(self.weight, name, kernel, qparams)

    def apply_weight(self, name: str, kernel, qparams, block=None):
        """The kernel [in, out] of linear `name` as the forward uses it (fake-quantized if it has a scale)."""
        if self.weight is None or name not in qparams:
            return kernel
        return fake_quant(kernel, self.weight, scale=static_qparams(qparams, name)[0])


@dataclasses.dataclass(frozen=True)
class Capture:
    """A recipe that runs `inner` (a QuantRecipe) and sows statistics as nnx.Intermediate:

    `ranges`: per-token (min, max) of every quantization site's input as its quantizer sees it ("<site>_min",
    "<site>_max"; activation sites [B, L], KV sites [B, L, KV]): outlier detection and calibration.
    `gram`: the sum over tokens of x^T x [C, C] at each activation site ("<site>_gram", GPTQ's Hessian).
    `qkv`: the attention's q after R3 ("q_attn") and the KV sites' inputs ("k_cache_x", "v_cache_x"),
    [B, L, heads, hd] float32: the per-head KV clip searches (quant/clip_search.py).
    Everything else (spec, weight, sites, product, bias, ...) is `inner`'s."""

    inner: object
    ranges: bool = False
    gram: bool = False
    qkv: bool = False

    def __getattr__(self, name):
        if name == "inner" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def apply_site(self, name: str, x, qparams, block=None):
        inner = self.inner
        if name not in QUANT_SITES or block is None:
            y = inner.apply_site(name, x, qparams, block)
            if self.qkv and block is not None and name == "q_rot":
                block.sow(nnx.Intermediate, "q_attn", y.astype(jnp.float32))
            return y
        x = inner.site_input(name, x, qparams, block)
        if self.gram and name in ACT_SITES:
            xf = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
            block.sow(nnx.Intermediate, name + "_gram", xf.T @ xf)
        if self.ranges:
            xf = x.astype(jnp.float32)
            block.sow(nnx.Intermediate, name + "_min", xf.min(axis=-1))
            block.sow(nnx.Intermediate, name + "_max", xf.max(axis=-1))
        if self.qkv and name in KV_SITES:
            block.sow(nnx.Intermediate, name + "_x", x.astype(jnp.float32))
        return inner.site_output(name, x, qparams, block)


def hands_qact(recipe, site: str, spec: QuantSpec) -> bool:
    """Whether activation site `site` (quantizer `spec`) of a recipe with matmul "int" hands its linears a
    QArray: symmetric per-tensor or per-token activations feeding quantized weights."""
    return (recipe.matmul == "int" and recipe.weight is not None and site in ACT_SITES and spec.symmetric
            and spec.granularity in ("tensor", "token"))


def static_qparams(qparams, where: str):
    """(scale, zero point or None) arrays of the static quantizer at `where` (a site or a linear name) in a
    block's `qparams`; KeyError when it has none."""
    q = qparams[where]
    return q["scale"][...], (q["zero"][...] if "zero" in q else None)


def weight_parts(weight: QuantSpec | None, name: str, kernel, qparams):
    """(fake-quantized kernel, codes, scale [1, out]) of linear `name` with its static scale
    qparams[name]["scale"], or None without a weight quantizer or scale."""
    if weight is None or name not in qparams:
        return None
    qw = quantize(kernel, weight, scale=static_qparams(qparams, name)[0], ste=True)
    return qw.dequantize(kernel.dtype), qw.qvalue, qw.scale


def sown_value(v):
    """The array a single `sow` stored (NNX keeps sown values in a tuple)."""
    return v[0] if isinstance(v, (tuple, list)) else v


def pair_ranges(merged: dict) -> dict:
    """{"<site>_min": a, "<site>_max": b, ...} -> {site: (a, b)}."""
    sites = {k.rsplit("_", 1)[0] for k in merged}
    return {s: (merged[s + "_min"], merged[s + "_max"]) for s in sites}


__all__ = ["ACT_SITES", "Capture", "KV_SITES", "QUANT_SITES", "QuantRecipe", "WEIGHT_NAMES", "hands_qact",
           "pair_ranges", "sown_value", "static_qparams", "weight_parts"]
