"""Flax NNX Llama: RMSNorm, RoPE, GQA attention with a KV cache, SwiGLU MLP, tied or untied head.

Parameters are stored as `kernel` [in, out] (x @ kernel), so a Hugging Face `weight` [out, in] is
its transpose. The pure-dict form of the parameters (see `Llama.from_params` / `params_dict`) is
what the converter, the rotations and the exporters exchange:

    {"embed": [V, D], "final_norm": [D], "lm_head": [D, V] (untied only),
     "layers": {i: {"input_norm": [D], "post_norm": [D],
                    "attn": {"q": [D, H*hd], "k": [D, KV*hd], "v": [D, KV*hd], "o": [H*hd, D]},
                    "mlp": {"gate": [D, F], "up": [D, F], "down": [F, D]}}}}

and, per family (config.FAMILIES), in "attn": "q_bias" [H*hd], "k_bias" [KV*hd], "v_bias" [KV*hd]
(`config.attention_bias`, Qwen2: added after the product) and "q_norm", "k_norm" [hd] (`config.qk_norm`,
Qwen3: an RMSNorm over each head of q and k, between the projection and RoPE). A Llama has neither, and its
forward is unchanged by them (no zero bias, no identity norm).

Quantization and rotation hook in through one place: `Block.site(name, x)`, called at the named
sites `qkv_in`, `k_cache`, `v_cache`, `o_in`, `up_gate_in`, `down_in`; the block's `recipe` (a
static, frozen object or None) decides what happens there, and `Block.linear` asks it for each
kernel (weight quantization). With `recipe=None` the model is exactly
the FP Llama.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefixquant_jax.nn.config import ModelConfig
from prefixquant_jax.errors import UserError
from prefixquant_jax.kv_cache import KVCache
from prefixquant_jax.quant.int_matmul import exact_in_f32, int_linear
from prefixquant_jax.quant.qarray import QArray
from prefixquant_jax.quant.recipe import LINEAR_MODULES, WEIGHT_NAMES


class QuantParam(nnx.Variable):
    """Quantizer state (scales, zero points): the trainable set of PrefixQuant fine-tuning. Filter by a
    subclass to take one kind alone, e.g. `nnx.split(model, Scale, ...)` for gradients w.r.t. the scales."""


class Scale(QuantParam):
    """A static quantizer's scale: a site's ([1, 1, 1] per tensor, [KV, 1] per head), a weight's [1, out]."""


class ZeroPoint(QuantParam):
    """A static asymmetric quantizer's zero point (same shape as its scale)."""


def legacy_qparams_key(key: str) -> tuple[str, str]:
    """(where, field) of a qparams key of the layout before typed quantizer variables, where one flat dict held
    "<site>", "<site>_zero" and "w_<linear>": "w_q" -> ("q", "scale"), "k_cache_zero" -> ("k_cache", "zero"),
    "qkv_in" -> ("qkv_in", "scale"). Reads checkpoints and training directories written before."""
    if key.startswith("w_") and key[2:] in WEIGHT_NAMES:
        return key[2:], "scale"
    if key.endswith("_zero"):
        return key[:-len("_zero")], "zero"
    return key, "scale"


def _param(a, dtype):
    return nnx.Param(jnp.asarray(a, dtype))


class Linear(nnx.Module):
    def __init__(self, kernel, dtype, bias=None):
        self.kernel = _param(kernel, dtype)
        self.bias = None if bias is None else _param(bias, dtype)

    def __call__(self, x):
        y = x @ self.kernel[...]
        return y if self.bias is None else y + self.bias[...]


class RMSNorm(nnx.Module):
    def __init__(self, weight, eps: float, dtype):
        self.weight = _param(weight, dtype)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def rope_tables(config: ModelConfig, positions):
    """cos, sin of shape [L, head_dim] for integer positions [L] (HF `rotate_half` convention)."""
    inv = jnp.asarray(config.inv_freq(), jnp.float32)
    ang = positions.astype(jnp.float32)[:, None] * inv[None, :]
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin):
    """x: [B, L, heads, hd]; cos/sin: [L, hd]."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return (x.astype(jnp.float32) * c + rot.astype(jnp.float32) * s).astype(x.dtype)


def _attend(q, k, v, qpos):
    """q: [B, H, l, hd] at positions qpos [l]; k, v: [B, H, t, hd] (rows 0..t-1)."""
    s = jnp.einsum("bhld,bhtd->bhlt", q, k, preferred_element_type=jnp.float32) / np.sqrt(q.shape[-1])
    s = jnp.where(jnp.arange(k.shape[2])[None, :] <= qpos[:, None], s, -jnp.inf)
    return jnp.einsum("bhlt,bhtd->bhld", jax.nn.softmax(s, axis=-1).astype(v.dtype), v)


def attention(q, k, v, offset, num_kv_heads, query_chunk: int = 512):
    """Causal GQA attention of new queries against a cache.

    q: [B, L, H, hd] at positions offset..offset+L-1; k, v: [B, T, KV, hd] (cache rows 0..T-1),
    with offset + L <= T. Key row t is visible to query i iff t <= offset + i. Softmax in fp32.
    Long query blocks are split in chunks; chunk c never needs keys past T - L + (c+1)*chunk, a
    static bound, so the masked upper triangle is mostly skipped (about 40% less work at L=2048).
    """
    B, L, H, hd = q.shape
    T = k.shape[1]
    g = H // num_kv_heads
    qh = q.transpose(0, 2, 1, 3)
    kh = jnp.repeat(k, g, axis=2).transpose(0, 2, 1, 3)
    vh = jnp.repeat(v, g, axis=2).transpose(0, 2, 1, 3)
    qpos = offset + jnp.arange(L)
    if L < 2 * query_chunk:
        out = _attend(qh, kh, vh, qpos)
    else:
        parts = []
        for s in range(0, L, query_chunk):
            e = min(L, s + query_chunk)
            t = T - L + e
            parts.append(_attend(qh[:, :, s:e], kh[:, :, :t], vh[:, :, :t], qpos[s:e]))
        out = jnp.concatenate(parts, axis=2)
    return out.transpose(0, 2, 1, 3).reshape(B, L, H * hd)


class Attention(nnx.Module):
    def __init__(self, p: dict, dtype, config: ModelConfig | None = None):
        bias = config is not None and config.attention_bias
        self.q, self.k, self.v = (Linear(p[n], dtype, p[n + "_bias"] if bias else None) for n in ("q", "k", "v"))
        self.o = Linear(p["o"], dtype)
        norm = config is not None and config.qk_norm
        self.q_norm = RMSNorm(p["q_norm"], config.rms_norm_eps, dtype) if norm else None
        self.k_norm = RMSNorm(p["k_norm"], config.rms_norm_eps, dtype) if norm else None


class MLP(nnx.Module):
    def __init__(self, p: dict, dtype):
        self.gate, self.up, self.down = (Linear(p[n], dtype) for n in ("gate", "up", "down"))


class Block(nnx.Module):
    """One decoder layer. `recipe` (static) routes the named quantization/rotation sites."""

    def __init__(self, config: ModelConfig, p: dict, dtype, recipe: Any = None):
        self.config = config
        self.input_norm = RMSNorm(p["input_norm"], config.rms_norm_eps, dtype)
        self.post_norm = RMSNorm(p["post_norm"], config.rms_norm_eps, dtype)
        self.attn = Attention(p["attn"], dtype, config)
        self.mlp = MLP(p["mlp"], dtype)
        self.recipe = recipe
        # where -> {"scale": Scale, "zero": ZeroPoint (asymmetric only)}, filled by calibration; `where` is a
        # quantization site (quant.recipe.QUANT_SITES) for an activation / KV quantizer, a linear (WEIGHT_NAMES) for a weight's
        self.qparams = nnx.Dict()
        self.transforms = nnx.Dict()  # FlatQuant's TransformParams (flatquant/transforms.py); empty otherwise

    def set_quantizer(self, where: str, scale, zero=None) -> None:
        """Give the static quantizer at `where` (a site or a linear name) its scale and, asymmetric, zero point."""
        q = nnx.Dict(scale=Scale(scale))
        if zero is not None:
            q["zero"] = ZeroPoint(zero)
        self.qparams[where] = q

    def site(self, name: str, x):
        """Apply whatever the recipe puts at site `name` (identity for the FP model).

        The recipe must provide `apply_site(name, x, qparams, block)`; see quant/recipe.py."""
        if self.recipe is None:
            return x
        return self.recipe.apply_site(name, x, self.qparams, self)

    def linear_module(self, name: str) -> Linear:
        """The Linear called `name` (quant.recipe.LINEAR_MODULES: q k v o under attn, gate up down under mlp)."""
        return getattr(getattr(self, LINEAR_MODULES[name]), name)

    def linear(self, name: str, x):
        """x @ kernel of linear `name` (q k v o gate up down), as the recipe quantizes it. x may be a QArray
        (a site of a recipe with int_matmul): then the runtime's integer product (quant/int_matmul.py)."""
        mod = self.linear_module(name)
        y = self._product(name, mod.kernel[...], x)
        if mod.bias is None:
            return y
        b = mod.bias[...]  # added after the (integer or float) product, as the runtime does
        hook = getattr(self.recipe, "apply_bias", None)  # FlatQuant's unmerged v: the bias times P_v
        return y + (b if hook is None else hook(name, b, block=self)).astype(y.dtype)

    def _product(self, name: str, k, x):
        if isinstance(x, QArray):  # activations in the model's dtype, like the kernels
            value = x.dequantize(k.dtype)
            parts = self.recipe.weight_parts(name, k, self.qparams)
            if parts is not None:
                k_fq, qw, sw = parts
                exact = exact_in_f32(x.bits, self.recipe.weight.bits, k.shape[0])
                return int_linear(value, k_fq, x.qvalue, x.scale, qw, sw, not exact).astype(value.dtype)
            x = value
        if self.recipe is not None:
            k = self.recipe.apply_weight(name, k, self.qparams, block=self)
        return x @ k

    def __call__(self, x, cache_k, cache_v, offset, cos, sin):
        c = self.config
        B, L, _ = x.shape
        h = self.site("qkv_in", self.input_norm(x))
        q = self.linear("q", h).reshape(B, L, c.num_heads, c.head_dim)
        k = self.linear("k", h).reshape(B, L, c.num_kv_heads, c.head_dim)
        v = self.linear("v", h).reshape(B, L, c.num_kv_heads, c.head_dim)
        if self.attn.q_norm is not None:  # Qwen3: per-head RMSNorm before RoPE
            q, k = self.attn.q_norm(q), self.attn.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k = self.site("q_rot", q), self.site("k_rot", k)  # R3 lives here
        k, v = self.site("k_cache", k), self.site("v_cache", v)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, offset, 0, 0))
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, offset, 0, 0))
        a = attention(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), offset, c.num_kv_heads)
        x = x + self.linear("o", self.site("o_in", a))
        h = self.site("up_gate_in", self.post_norm(x))
        m = jax.nn.silu(self.linear("gate", h)) * self.linear("up", h)
        m = self.site("down_in", self.site("down_rot", m))  # R4 then quantize
        return x + self.linear("down", m), cache_k, cache_v


class Llama(nnx.Module):
    def __init__(self, config: ModelConfig, params: dict, dtype=jnp.float32, recipe: Any = None):
        self.config = config
        self.dtype = dtype
        self.embed = _param(params["embed"], dtype)
        self.layers = nnx.List([Block(config, params["layers"][i], dtype, recipe) for i in range(config.num_layers)])
        self.final_norm = RMSNorm(params["final_norm"], config.rms_norm_eps, dtype)
        self.lm_head = None if config.tie_word_embeddings else _param(params["lm_head"], dtype)
        # P of the FP prefix a quantized model was calibrated behind (set by the pipeline and the loader):
        # a call without a cache would silently drop it, so it raises (QuantizedModel.apply runs behind it)
        self.prefix_len = 0

    @classmethod
    def from_params(cls, config: ModelConfig, params: dict, dtype=jnp.float32, recipe: Any = None) -> "Llama":
        return cls(config, params, dtype, recipe)

    def params_dict(self) -> dict:
        """The pure nested dict of parameters (layout in the module docstring)."""
        d = {"embed": self.embed[...], "final_norm": self.final_norm.weight[...],
             "layers": {i: _block_dict(b) for i, b in enumerate(self.layers)}}
        if self.lm_head is not None:
            d["lm_head"] = self.lm_head[...]
        return d

    def hidden(self, tokens, cache: KVCache, offset):
        """Run the decoder over tokens [B, L] written at cache rows offset..offset+L-1.

        Returns (final-normed hidden [B, L, D], updated cache)."""
        L = tokens.shape[1]
        self.config.check_length(cache.k[0].shape[1])
        cos, sin = rope_tables(self.config, offset + jnp.arange(L))
        x = self.embed[...][tokens]
        ks, vs = [], []
        for i, blk in enumerate(self.layers):
            x, k, v = blk(x, cache.k[i], cache.v[i], offset, cos, sin)
            ks.append(k)
            vs.append(v)
        return self.final_norm(x), KVCache(k=ks, v=vs)

    def head(self, h):
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.dot(h, w, preferred_element_type=jnp.float32)

    def __call__(self, tokens, cache: KVCache | None = None, offset=0):
        """Logits [B, L, V] in fp32 and the updated cache (a fresh one of length L when None).

        The low-level forward: tokens at absolute positions offset..offset+L-1 of `cache`. A model calibrated
        behind a prefix (prefix_len > 0) needs that cache (kv_cache.behind_prefix): without one it raises."""
        if cache is None:
            if self.prefix_len:
                raise UserError(f"this model was calibrated behind a {self.prefix_len}-token FP prefix: run it "
                                "through QuantizedModel.apply (or give a cache from kv_cache.behind_prefix)")
            cache = KVCache.empty(self.config, tokens.shape[0], tokens.shape[1], self.dtype)
        h, cache = self.hidden(tokens, cache, offset)
        return self.head(h), cache


def _block_dict(b: Block) -> dict:
    attn = {n: getattr(b.attn, n).kernel[...] for n in ("q", "k", "v", "o")}
    for n in ("q", "k", "v"):
        if getattr(b.attn, n).bias is not None:
            attn[n + "_bias"] = getattr(b.attn, n).bias[...]
    if b.attn.q_norm is not None:
        attn["q_norm"], attn["k_norm"] = b.attn.q_norm.weight[...], b.attn.k_norm.weight[...]
    return {"input_norm": b.input_norm.weight[...], "post_norm": b.post_norm.weight[...], "attn": attn,
            "mlp": {n: getattr(b.mlp, n).kernel[...] for n in ("gate", "up", "down")}}


def with_recipe(model, recipe: Any):
    """A new model (a Llama, or one Block) whose blocks use `recipe`; it shares every variable (weights,
    qparams, transforms) with `model`, which is left as it was. The recipe is static, so it is part of
    the new model's graphdef: one compilation per recipe."""
    graphdef, state = nnx.split(model)
    new = nnx.merge(graphdef, state)  # the same Variable objects, new module objects
    for b in (new.layers if isinstance(new, Llama) else [new]):
        b.recipe = recipe
    return new

