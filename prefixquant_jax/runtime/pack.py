"""Pack a fake-quantized model (QuantizedModel) into the real integer model: the same Decoder (nn/decoder.py) whose
kernels are integer codes and whose blocks run RuntimeRecipe (runtime/recipe.py), with an integer KV cache.

The fake-quant model keeps float kernels and fake-quantizes them at every forward; here the same quantizer is
applied once and its codes are stored (quant/qarray.py, the one encoder):

  weights    each Linear's kernel becomes PackedCodes: 4-bit codes two per byte along `in` (pallas_kernels.int4
             layout: int8 [in/2, out]), 8-bit codes int8 [in, out]; its scale qparams[<name>]["scale"] [1, out]
             floored at EPS as the encoder floors it
  sites      static activation / KV scales stay in qparams (read and floored at each call, as the fake quantizers
             do); dynamic ones are computed per token; FlatQuant's online factors and LAC logits stay in
             block.transforms
  FP         embeddings, norms, head and q/k/v biases in the compute dtype; the FP prefix rows (float32) as they are

`pack` raises a one-line UserError for what the integer runtime cannot run: an unmerged FlatQuant model, no weight
quantization, weight/activation/KV bits other than 4 or 8, an FP or symmetric KV cache.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prefixquant_jax.errors import UserError
from prefixquant_jax.nn.decoder import WEIGHT_NAMES, Decoder, with_recipe
from prefixquant_jax.nn.variables import Scale
from prefixquant_jax.quant.qarray import quantize
from prefixquant_jax.quant.recipe import ACT_SITES, QuantRecipe
from prefixquant_jax.runtime.kernel_choice import KERNELS
from prefixquant_jax.runtime.recipe import BACKENDS, RuntimeRecipe


class PackedCodes(nnx.Variable):
    """A linear's integer weight codes (int8; 4 bits: two per byte along `in`)."""


def default_backend() -> str:
    """"kernels" on a GPU (Pallas compiles there), else "xla"."""
    return "kernels" if jax.default_backend() in ("gpu", "cuda", "rocm") else "xla"


def check_packable(recipe, name: str = "") -> None:
    """UserError (one line) unless the integer runtime can run `recipe`."""
    unsupported = f"{name or recipe.name!r} cannot run on the real int4 backend:"
    if recipe.method == "flatquant":
        if not recipe.merged:
            raise UserError(f"{unsupported} its FlatQuant transforms are not merged into the weights (flatquant.merge_model)")
    elif not isinstance(recipe, QuantRecipe):
        raise UserError(f"{unsupported} its recipe {type(recipe).__name__} has online parts the int4 runtime does not "
                        "implement (use backend 'fake', the fake-quant model)", "backend 'fake'")
    w = recipe.weight
    if w is None:
        raise UserError(f"{unsupported} its weights are not quantized (use backend 'fake', the fake-quant model)",
                        "backend 'fake'")
    if w.bits not in (4, 8) or w.granularity != "channel" or not w.symmetric:
        raise UserError(f"{unsupported} weights must be symmetric per-channel 4 or 8 bits, got {w.bits} bits {w.granularity}")
    for site in ACT_SITES:
        s = recipe.spec(site)
        if s is not None and (s.bits not in (4, 8) or not s.symmetric
                              or s.granularity != ("token" if s.dynamic else "tensor")):
            raise UserError(f"{unsupported} activation site {site} must be symmetric 4 or 8 bits, static per tensor or "
                            f"dynamic per token, got {s.bits} bits {s.granularity}{' dynamic' if s.dynamic else ''}")
    kv = [recipe.spec(s) for s in ("k_cache", "v_cache")]
    if any(s is None for s in kv):
        raise UserError(f"{unsupported} its KV cache is not quantized (the runtime stores an integer KV cache)")
    if (any(s.symmetric or s.granularity != ("token" if s.dynamic else "head") for s in kv)
            or kv[0].dynamic != kv[1].dynamic or kv[0].clip_ratio != kv[1].clip_ratio):
        raise UserError(f"{unsupported} its K and V caches must be asymmetric, static per head or dynamic per "
                        f"(token, head), got {kv[0].granularity}/{kv[1].granularity}")
    if kv[0].bits != kv[1].bits or kv[0].bits not in (4, 8):
        raise UserError(f"{unsupported} KV bits must be 4 or 8, got {kv[0].bits}/{kv[1].bits}")


def weight_qarray(kernel, scale, spec):
    """The codes of a float kernel [in, out] under its scale [1, out], from the fake model's own encoder, 4-bit
    codes packed two per byte along `in` (the kernels' layout)."""
    if spec.bits == 4 and kernel.shape[0] % 2:
        raise UserError(f"int4 weights need an even input size, got {kernel.shape[0]}")
    return quantize(jnp.asarray(kernel, jnp.float32), spec.replace(dynamic=False),
                    scale=jnp.asarray(scale, jnp.float32).reshape(1, -1)).pack(axis=0)


def pack(qm, backend: str | None = None, dtype=None, kernels: str = "auto", interpret: bool | None = None) -> Decoder:
    """The packed integer model of QuantizedModel `qm` (module docstring): a Decoder sharing qm.model's quantizer
    state and prefix. backend: "kernels" | "xla" | None (default_backend()); dtype: compute dtype (default: the
    model's); kernels: "auto" | "mosaic" | "triton", the GEMMs' Pallas backend (runtime/kernel_choice.py)."""
    if kernels not in KERNELS:
        raise UserError(f"unknown kernels {kernels!r} (one of {', '.join(KERNELS)})", "RuntimeRecipe.kernels")
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise UserError(f"unknown runtime backend {backend!r} (one of {', '.join(BACKENDS)})")
    recipe = qm.model.recipe
    check_packable(recipe)
    cdt = jnp.dtype(dtype or qm.model.dtype)
    packed = with_recipe(qm.model, RuntimeRecipe(recipe, backend=backend, kernels=kernels, interpret=interpret))
    cast = lambda v: nnx.Param(jnp.asarray(v[...], cdt))
    packed.dtype = cdt
    packed.embed = cast(packed.embed)
    packed.final_norm.weight = cast(packed.final_norm.weight)
    if packed.lm_head is not None:
        packed.lm_head = cast(packed.lm_head)
    static = [site for site, spec in recipe.sites if not spec.dynamic]
    for i, blk in enumerate(packed.layers):
        missing = [w for w in static + list(WEIGHT_NAMES) if w not in blk.qparams]
        if missing:
            raise UserError(f"layer {i} has no quantizer parameters at {missing[0]!r} (an uncalibrated model?); the "
                            "real backend needs them")
        blk.dtype = cdt
        norms = [blk.input_norm, blk.post_norm] + ([blk.attn.q_norm, blk.attn.k_norm] if blk.attn.q_norm else [])
        for norm in norms:
            norm.weight = cast(norm.weight)
        for name in WEIGHT_NAMES:
            mod = blk.linear_module(name)
            q = weight_qarray(mod.kernel[...], blk.qparams[name]["scale"][...], recipe.weight)
            mod.kernel = PackedCodes(q.qvalue)
            blk.qparams[name] = nnx.Dict(scale=Scale(q.scale))
            if mod.bias is not None:
                mod.bias = cast(mod.bias)
    return packed
