"""QuantRecipe: what the model does at each named site (rotate, fake-quantize); Capture: a recipe around
another that also records statistics there.

A recipe is static (frozen, hashable): it is part of the jitted graph, while the numbers it needs
(static scales, zero points) live in each block's `qparams`, one entry per quantizer, as typed variables
(model.Scale, model.ZeroPoint, both QuantParam):
  qparams[site]["scale"]    Scale, broadcastable to the site's input ([1,1,1] per tensor, [KV,1] per head)
  qparams[site]["zero"]     ZeroPoint (asymmetric static sites only)
  qparams[linear]["scale"]  per-output-channel weight Scale [1, out] for linear in WEIGHT_NAMES
(`Block.set_quantizer` writes an entry, `static_qparams` reads one).
Kernels stay full precision in the model; with `weight` set, the forward fake-quantizes each kernel
with its scale (straight-through), so weights and their scales can both be trained.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from prefixquant_jax.quant.qarray import fake_quant, quantize
from prefixquant_jax.quant.spec import QuantSpec
from prefixquant_jax.rotate.hadamard import hadamard_transform

ACT_SITES = ("qkv_in", "o_in", "up_gate_in", "down_in")
KV_SITES = ("k_cache", "v_cache")
QUANT_SITES = ACT_SITES + KV_SITES
# The linears of a block, each with the Block submodule that holds it (model.Block.linear_module): the one list of
# these names (the model, the weight quantizer's qparams keys, the checkpoint and the exporters derive theirs from it)
LINEAR_MODULES = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}
WEIGHT_NAMES = tuple(LINEAR_MODULES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRecipe:
    """`sites`: (site, QuantSpec) pairs; unnamed sites stay FP. `weight`: static per-channel weight
    quantizer (scales in qparams[<linear>]["scale"]; a linear without one stays FP). `r3`/`r4`: online Hadamards.
    Statistics (ranges, Gram matrices, q/K/V) are captured by wrapping a recipe in `Capture`.
    """

    sites: tuple[tuple[str, QuantSpec], ...] = ()
    weight: QuantSpec | None = None
    r3: bool = False
    r4: bool = False
    int_matmul: bool = False  # compute quantized linears as the integer runtime does (quant/int_matmul.py)

    def spec(self, site: str) -> QuantSpec | None:
        return dict(self.sites).get(site)

    def replace(self, **kw) -> "QuantRecipe":
        return dataclasses.replace(self, **kw)

    def apply_site(self, name: str, x, qparams, block=None):
        if name in ("q_rot", "k_rot"):
            return hadamard_transform(x) if self.r3 else x
        if name == "down_rot":
            return hadamard_transform(x) if self.r4 else x
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

    def weight_parts(self, name: str, kernel, qparams):
        return weight_parts(self.weight, name, kernel, qparams)

    def apply_weight(self, name: str, kernel, qparams, block=None):
        """The kernel [in, out] of linear `name` as the forward uses it (fake-quantized if it has a scale)."""
        if self.weight is None or name not in qparams:
            return kernel
        return fake_quant(kernel, self.weight, scale=static_qparams(qparams, name)[0])


@dataclasses.dataclass(frozen=True)
class Capture:
    """A recipe that runs `inner` (a QuantRecipe or FlatQuantRecipe) and sows statistics as nnx.Intermediate:

    `ranges`: per-token (min, max) of every quantization site's input as its quantizer sees it ("<site>_min",
    "<site>_max"; activation sites [B, L], KV sites [B, L, KV]): outlier detection and calibration.
    `gram`: the sum over tokens of x^T x [C, C] at each activation site ("<site>_gram", GPTQ's Hessian).
    `qkv`: the attention's q after R3 ("q_attn") and the KV sites' inputs ("k_cache_x", "v_cache_x"),
    [B, L, heads, hd] float32: the per-head KV clip searches (quant/clip_search.py).
    Everything else (spec, weight, sites, int_matmul, weights, biases) is `inner`'s."""

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
    """Whether activation site `site` (quantizer `spec`) of a recipe with int_matmul hands its linears a QArray:
    symmetric per-tensor or per-token activations feeding quantized weights."""
    return (recipe.int_matmul and recipe.weight is not None and site in ACT_SITES and spec.symmetric
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
