"""The one decoder (Llama, Mistral, Qwen2, Qwen3) in Flax NNX: RMSNorm, RoPE, GQA attention behind the model's FP
prefix, SwiGLU MLP, tied or untied head. The FP model, the fake-quant model and the packed integer model are all
this module; what differs is intercepted at two kinds of named places, by the blocks' static `recipe`:

  sites     `Block.site(name, x)` at qkv_in, q_rot, k_rot, k_cache, v_cache, o_in, up_gate_in, down_rot, down_in:
            rotate, transform, quantize (fake-quant floats, or QArrays for integer products)
  linears   `Block.linear(name, x)` for q k v o gate up down: the product (a fake-quantized float kernel, an exact
            integer product, or the runtime's integer GEMM over packed codes) and the bias
and in the KV cache each layer writes to and reads from (nn/cache.py LayerKV, or the runtime's integer cache).
With `recipe=None` a block is exactly the FP layer.

Parameters are stored as `kernel` [in, out] (x @ kernel), so a Hugging Face `weight` [out, in] is its transpose.
The pure-dict form (`Decoder(config, params)`, `Decoder.params_dict`), which converters, rotations and exporters
exchange:

    {"embed": [V, D], "final_norm": [D], "lm_head": [D, V] (untied only),
     "layers": {i: {"input_norm": [D], "post_norm": [D],
                    "attn": {"q": [D, H*hd], "k": [D, KV*hd], "v": [D, KV*hd], "o": [H*hd, D]},
                    "mlp": {"gate": [D, F], "up": [D, F], "down": [F, D]}}}}

and, per family (config.FAMILIES), in "attn": "q_bias" [H*hd], "k_bias" [KV*hd], "v_bias" [KV*hd] (Qwen2: added
after the product) and "q_norm", "k_norm" [hd] (Qwen3: an RMSNorm over each head of q and k before RoPE).

The FP prefix (PrefixQuant) is model state: each block holds its prefix K/V rows (variables.Prefix) and attends
to them in front of its cache, so `model(tokens)` and `model(tokens, cache)` need no argument about it.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefixquant_jax.nn.cache import Cache, LayerKV, PrefixKV
from prefixquant_jax.nn.config import ModelConfig
from prefixquant_jax.nn.variables import Prefix, Scale, ZeroPoint

# The linears of a block, each with the Block submodule that holds it: the one list of these names
LINEAR_MODULES = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}
WEIGHT_NAMES = tuple(LINEAR_MODULES)


def rms_norm(x, weight, eps: float):
    """RMSNorm with fp32 statistics; the result in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


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
    """q: [B, H, l, hd] at positions qpos [l]; k, v: [B, H, t, hd] (positions 0..t-1)."""
    s = jnp.einsum("bhld,bhtd->bhlt", q, k, preferred_element_type=jnp.float32) / np.sqrt(q.shape[-1])
    s = jnp.where(jnp.arange(k.shape[2])[None, :] <= qpos[:, None], s, -jnp.inf)
    return jnp.einsum("bhlt,bhtd->bhld", jax.nn.softmax(s, axis=-1).astype(v.dtype), v)


QUERY_CHUNK = 512  # queries per attention chunk; blocks shorter than two chunks attend in one piece


def attention(q, k, v, pos, num_kv_heads, query_chunk: int = QUERY_CHUNK):
    """Causal GQA attention of new queries against all keys so far.

    q: [B, L, H, hd] at positions pos..pos+L-1; k, v: [B, T, KV, hd] at positions 0..T-1 (the prefix, then the
    cache rows), pos + L <= T. Key t is visible to query i iff t <= pos + i. Softmax in fp32. Long query blocks
    are split in chunks; chunk c never needs keys past T - L + (c+1)*chunk, a static bound, so the masked upper
    triangle is mostly skipped (about 40% less work at L=2048).
    """
    B, L, H, hd = q.shape
    T = k.shape[1]
    g = H // num_kv_heads
    qh = q.transpose(0, 2, 1, 3)
    kh = jnp.repeat(k, g, axis=2).transpose(0, 2, 1, 3)
    vh = jnp.repeat(v, g, axis=2).transpose(0, 2, 1, 3)
    qpos = pos + jnp.arange(L)
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


def _param(a, dtype):
    return nnx.Param(jnp.asarray(a, dtype))


class Linear(nnx.Module):
    """kernel [in, out] (an nnx.Param; the packed model: integer codes) and an optional bias [out]."""

    def __init__(self, kernel, dtype, bias=None):
        self.kernel = _param(kernel, dtype)
        self.bias = None if bias is None else _param(bias, dtype)


class RMSNorm(nnx.Module):
    def __init__(self, weight, eps: float, dtype):
        self.weight = _param(weight, dtype)
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)


class Attention(nnx.Module):
    def __init__(self, p: dict, dtype, config: ModelConfig):
        bias = config.attention_bias
        self.q, self.k, self.v = (Linear(p[n], dtype, p[n + "_bias"] if bias else None) for n in ("q", "k", "v"))
        self.o = Linear(p["o"], dtype)
        self.q_norm = RMSNorm(p["q_norm"], config.rms_norm_eps, dtype) if config.qk_norm else None
        self.k_norm = RMSNorm(p["k_norm"], config.rms_norm_eps, dtype) if config.qk_norm else None


class MLP(nnx.Module):
    def __init__(self, p: dict, dtype):
        self.gate, self.up, self.down = (Linear(p[n], dtype) for n in ("gate", "up", "down"))


class Block(nnx.Module):
    """One decoder layer. `recipe` (static) intercepts the sites and linears; `prefix` (k, v), each [P, KV, hd],
    the FP prefix rows this layer attends to in front of its cache."""

    def __init__(self, config: ModelConfig, p: dict, dtype, recipe: Any = None, prefix=None):
        self.config = config
        self.dtype = dtype
        self.input_norm = RMSNorm(p["input_norm"], config.rms_norm_eps, dtype)
        self.post_norm = RMSNorm(p["post_norm"], config.rms_norm_eps, dtype)
        self.attn = Attention(p["attn"], dtype, config)
        self.mlp = MLP(p["mlp"], dtype)
        self.recipe = recipe
        self.query_chunk = QUERY_CHUNK  # static: the trainer's shorter samples use smaller ones (pipeline/train.py)
        # where -> {"scale": Scale, "zero": ZeroPoint (asymmetric only)}: `where` is a quantization site for an
        # activation / KV quantizer, a linear (WEIGHT_NAMES) for a weight's; filled by calibration
        self.qparams = nnx.Dict()
        self.transforms = nnx.Dict()  # FlatQuant's transforms by site (flatquant/transforms.py); empty otherwise
        self.set_prefix(prefix)

    def set_prefix(self, prefix) -> None:
        """Give the block its FP prefix rows (k, v), each [P, KV, hd], or none."""
        # nnx.data: the attribute stays a data slot (a Prefix may be set later) when it holds no prefix
        self.prefix_k = nnx.data(None) if prefix is None else Prefix(jnp.asarray(prefix[0], jnp.float32))
        self.prefix_v = nnx.data(None) if prefix is None else Prefix(jnp.asarray(prefix[1], jnp.float32))

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix_k is None else self.prefix_k.shape[0]

    def set_quantizer(self, where: str, scale, zero=None) -> None:
        """Give the static quantizer at `where` (a site or a linear name) its scale and, asymmetric, zero point."""
        q = nnx.Dict(scale=Scale(scale))
        if zero is not None:
            q["zero"] = ZeroPoint(zero)
        self.qparams[where] = q

    def linear_module(self, name: str) -> Linear:
        """The Linear called `name` (q k v o under attn, gate up down under mlp)."""
        return getattr(getattr(self, LINEAR_MODULES[name]), name)

    def site(self, name: str, x):
        """Whatever the recipe does at site `name` (identity for the FP model)."""
        if self.recipe is None:
            return x
        return self.recipe.apply_site(name, x, self.qparams, self)

    def linear(self, name: str, x):
        """Linear `name` of x (a float array, or the QArray a quantized site handed over), bias added after."""
        mod = self.linear_module(name)
        if hasattr(x, "qvalue"):  # a QArray: the recipe's product takes it as it is
            y = self.recipe.product(name, x, self)
        else:  # tokens as the rows of one 2-D product: XLA's backward then transposes less
            lead = x.shape[:-1]
            x2 = x.reshape(-1, x.shape[-1])
            y = x2 @ mod.kernel[...] if self.recipe is None else self.recipe.product(name, x2, self)
            y = y.reshape(*lead, y.shape[-1])
        if mod.bias is None:
            return y
        b = mod.bias[...] if self.recipe is None else self.recipe.bias(name, mod.bias[...], self)
        return y + b.astype(y.dtype)

    def linears(self, names, x):
        """The linears `names` of one shared input x (q, k, v; gate, up): the recipe may compute them as one product
        (`products`, which returns None where it does not), else one at a time."""
        group = getattr(self.recipe, "products", None)
        lead = x.shape[:-1]
        ys = None if group is None or hasattr(x, "qvalue") else group(names, x.reshape(-1, x.shape[-1]), self)
        if ys is None:
            return [self.linear(n, x) for n in names]
        out = []
        for n, y in zip(names, ys):
            y = y.reshape(*lead, y.shape[-1])
            bias = self.linear_module(n).bias
            out.append(y if bias is None else y + self.recipe.bias(n, bias[...], self).astype(y.dtype))
        return out

    def init_kv(self, batch: int, rows: int):
        """An empty cache of `rows` rows for this layer: the recipe's (the packed model's integer cache) or floats."""
        make = getattr(self.recipe, "init_kv", None)
        if make is not None:
            return make(self, batch, rows)
        return LayerKV.empty(self.config, batch, rows, self.dtype)

    def attend(self, q, kv, pos):
        """Attention of q [B, L, H, hd] at positions pos.. over the prefix and the cache `kv` (already written)."""
        if q.shape[1] == 1:
            fused = kv.decode(q, self, pos)  # the integer cache's decode kernel, where it applies
            if fused is not None:
                return fused
        k, v = kv.read(self)
        if self.prefix_k is not None:
            B = k.shape[0]
            k = jnp.concatenate([jnp.broadcast_to(self.prefix_k[...].astype(k.dtype)[None], (B,) + self.prefix_k.shape),
                                 k], axis=1)
            v = jnp.concatenate([jnp.broadcast_to(self.prefix_v[...].astype(v.dtype)[None], (B,) + self.prefix_v.shape),
                                 v], axis=1)
        return attention(q, k.astype(q.dtype), v.astype(q.dtype), pos, self.config.num_kv_heads, self.query_chunk)

    def __call__(self, x, kv, pos, cos, sin):
        """x [B, L, D] at positions pos..pos+L-1 (cos/sin of them); kv: this layer's cache. Returns (x, kv)."""
        c = self.config
        B, L, _ = x.shape
        h = self.site("qkv_in", self.input_norm(x))
        q, k, v = self.linears(("q", "k", "v"), h)
        q = q.reshape(B, L, c.num_heads, c.head_dim)
        k = k.reshape(B, L, c.num_kv_heads, c.head_dim)
        v = v.reshape(B, L, c.num_kv_heads, c.head_dim)
        if self.attn.q_norm is not None:  # Qwen3: per-head RMSNorm before RoPE
            q, k = self.attn.q_norm(q), self.attn.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k = self.site("q_rot", q), self.site("k_rot", k)  # R3 lives here
        k, v = self.site("k_cache", k), self.site("v_cache", v)
        kv = kv.write(k, v, pos - self.prefix_len)
        x = x + self.linear("o", self.site("o_in", self.attend(q, kv, pos)))
        h = self.site("up_gate_in", self.post_norm(x))
        gate, up = self.linears(("gate", "up"), h)
        m = jax.nn.silu(gate) * up
        m = self.site("down_in", self.site("down_rot", m))  # R4 then quantize
        return x + self.linear("down", m), kv


class Decoder(nnx.Module):
    """The model: embeddings, blocks, final norm, head; `prefix` (a PrefixKV) puts the FP prefix in its blocks."""

    def __init__(self, config: ModelConfig, params: dict, dtype=jnp.float32, recipe: Any = None,
                 prefix: PrefixKV | None = None):
        self.config = config
        self.dtype = dtype
        self.embed = _param(params["embed"], dtype)
        self.layers = nnx.List([Block(config, params["layers"][i], dtype, recipe) for i in range(config.num_layers)])
        self.final_norm = RMSNorm(params["final_norm"], config.rms_norm_eps, dtype)
        self.lm_head = None if config.tie_word_embeddings else _param(params["lm_head"], dtype)
        self._set_prefix(prefix)

    def _set_prefix(self, prefix: PrefixKV | None) -> None:
        # the ids, text and rotation flag are static metadata; the rows are the blocks' state
        self.prefix_meta = None if prefix is None else (prefix.prefix_ids, prefix.text, bool(prefix.k_rotated))
        for i, blk in enumerate(self.layers):
            blk.set_prefix(None if prefix is None else (prefix.k[i], prefix.v[i]))

    @property
    def recipe(self):
        return self.layers[0].recipe if len(self.layers) else None

    @property
    def prefix_len(self) -> int:
        """P: the prefix occupies positions 0..P-1; every token this model sees sits at P or later."""
        return 0 if self.prefix_meta is None else len(self.prefix_meta[0])

    @property
    def prefix_kv(self) -> PrefixKV | None:
        """The model's FP prefix as data (its rows read back from the blocks), None without one."""
        if self.prefix_meta is None:
            return None
        ids, text, k_rotated = self.prefix_meta
        return PrefixKV(k=[np.asarray(b.prefix_k[...]) for b in self.layers],
                        v=[np.asarray(b.prefix_v[...]) for b in self.layers],
                        prefix_ids=ids, text=text, k_rotated=k_rotated)

    def params_dict(self) -> dict:
        """The pure nested dict of parameters (layout in the module docstring)."""
        d = {"embed": self.embed[...], "final_norm": self.final_norm.weight[...],
             "layers": {i: block_params(b) for i, b in enumerate(self.layers)}}
        if self.lm_head is not None:
            d["lm_head"] = self.lm_head[...]
        return d

    def init_cache(self, batch: int, length: int) -> Cache:
        """An empty cache for `length` tokens after the prefix, at position P."""
        return Cache(kv=[blk.init_kv(batch, length) for blk in self.layers],
                     pos=jnp.asarray(self.prefix_len, jnp.int32))

    def hidden(self, tokens, cache: Cache):
        """Final-normed hidden [B, L, D] of tokens [B, L] at positions cache.pos.., and the updated cache."""
        L = tokens.shape[1]
        self.config.check_length(self.prefix_len + max(cache.rows, L))
        cos, sin = rope_tables(self.config, cache.pos + jnp.arange(L))
        x = self.embed[...][tokens]
        kv = []
        for blk, layer_kv in zip(self.layers, cache.kv):
            x, layer_kv = blk(x, layer_kv, cache.pos, cos, sin)
            kv.append(layer_kv)
        return self.final_norm(x), Cache(kv=kv, pos=cache.pos + L)

    def head(self, h):
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.dot(h, w, preferred_element_type=jnp.float32)

    def __call__(self, tokens, cache: Cache | None = None):
        """Logits [B, L, V] (fp32) of tokens [B, L] right after the prefix; with `cache` (init_cache, or returned by
        an earlier call) the tokens at cache.pos.., returning (logits, cache): prefill, then decode."""
        if cache is None:
            h, _ = self.hidden(tokens, self.init_cache(tokens.shape[0], tokens.shape[1]))
            return self.head(h)
        h, cache = self.hidden(tokens, cache)
        return self.head(h), cache


def block_params(b: Block) -> dict:
    """One block's pure params dict (the layout of the module docstring); references, no copies."""
    attn = {n: getattr(b.attn, n).kernel[...] for n in ("q", "k", "v", "o")}
    for n in ("q", "k", "v"):
        if getattr(b.attn, n).bias is not None:
            attn[n + "_bias"] = getattr(b.attn, n).bias[...]
    if b.attn.q_norm is not None:
        attn["q_norm"], attn["k_norm"] = b.attn.q_norm.weight[...], b.attn.k_norm.weight[...]
    return {"input_norm": b.input_norm.weight[...], "post_norm": b.post_norm.weight[...], "attn": attn,
            "mlp": {n: getattr(b.mlp, n).kernel[...] for n in ("gate", "up", "down")}}


def _copy(model):
    """A new module tree over the same Variable objects (the model it came from is left as it was)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, state)


def with_recipe(model, recipe: Any):
    """A new model (a Decoder, or one Block) whose blocks use `recipe`, sharing every variable with `model`. The
    recipe is static, so it is part of the new model's graphdef: one compilation per recipe."""
    new = _copy(model)
    for b in (new.layers if isinstance(new, Decoder) else [new]):
        b.recipe = recipe
    return new


def with_prefix(model: Decoder, prefix: PrefixKV | None) -> Decoder:
    """A new model with `prefix` as its FP prefix (None: without one), sharing every other variable with `model`."""
    new = _copy(model)
    new._set_prefix(prefix)
    return new
