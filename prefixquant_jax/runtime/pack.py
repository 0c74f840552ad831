"""Pack a fake-quantized model (QuantizedModel) into real integer tensors for the int4 runtime.

The fake-quant model keeps float kernels and fake-quantizes them at every forward; here the same
quantizers are applied once and their integer codes are stored:

  weights    QArrays (quant/qarray.py: the fake quantizer's own encoder) of the kernels under their scales
             qparams[<name>]["scale"] [1, out]; 4-bit codes packed two per byte along axis 0 (pallas_kernels.int4
             layout: int8 [in/2, out]), 8-bit codes as int8 [in, out]. q|k|v and gate|up are concatenated
             QArrays along `out` (one GEMM each: same input, per-column scales, so the result is column-wise
             identical; codes are concatenated, never re-quantized).
  activations  static sites: scale max(qparams[site]["scale"], 1e-8) f32 [1, 1]; dynamic (per token) sites: no
             stored scale; FP sites: nothing. The per-site spec lives in the static RuntimeSpec.
  KV cache   static per head, asymmetric: scale max(qparams[k|v_cache]["scale"], 1e-8) f32 [KV], zero
             round(qparams[k|v_cache]["zero"]) f32 [KV], codes in [0, 2^b - 1]. Dynamic per (token, head)
             (O1, QuaRot): nothing stored here; each token's scale and zero are computed when it is
             written and kept in the cache beside its codes (runtime.model.QuantKVCache).
  FP         embed [V, D], final_norm [D], lm_head [D, V] (or None when tied), norms [D] in the compute
             dtype; the prefix KV per layer [P, KV, hd] in float32 (K after RoPE and R3, as attention reads it).

  FlatQuant  a merged FlatQuant model's kernels already hold P^-1 and its scales; its online factors and
             LAC logits go to PackedLayer.flat (runtime/flat.py).

`pack(qm)` raises a one-line UserError for what the integer runtime cannot run: an unmerged FlatQuant
model, no weight quantization, weight/activation/KV bits other than 4 or 8, an FP or symmetric KV
cache, and static sites without a scale.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from prefixquant_jax.nn.config import ModelConfig
from prefixquant_jax.errors import UserError
from prefixquant_jax.quant.qarray import EPS, QArray, concatenate, quantize
from prefixquant_jax.quant.recipe import ACT_SITES, QuantRecipe, static_qparams
from prefixquant_jax.quant.spec import QuantSpec
from prefixquant_jax.runtime.flat import layer_params
from prefixquant_jax.runtime.kernel_choice import KERNELS

BACKENDS = ("kernels", "xla")


@dataclasses.dataclass(frozen=True)
class ActSpec:
    """How one activation site is quantized: bits 4 (int4 packed) or 8 (int8); dynamic = per token."""

    bits: int
    dynamic: bool
    clip_ratio: float = 1.0
    full_grid: bool = False  # QuantSpec.full_grid: dynamic scale amax / (qmax + 1/2)


@dataclasses.dataclass(frozen=True)
class RuntimeSpec:
    """Static (hashable) description of a packed model; part of the jitted graph.

    act: (site, ActSpec or None) for qkv_in, o_in, up_gate_in, down_in (None: FP activations, float matmul).
    backend: "kernels" (Pallas; interpret mode off GPU) or "xla" (the same integer pipeline via the
    kernels' *_ref jnp references). dtype: compute dtype name ("float32" or "bfloat16").
    kv_dynamic: per-(token, head) asymmetric KV with clip ratio kv_clip, else static per head.
    """

    config: ModelConfig
    w_bits: int
    act: tuple[tuple[str, ActSpec | None], ...]
    kv_bits: int
    kv_dynamic: bool
    kv_clip: float
    r3: bool
    r4: bool
    prefix_len: int
    backend: str
    dtype: str
    preset: str = ""
    flat: bool = False  # FlatQuant: online transforms and LAC at the sites (runtime/flat.py)
    kv_original_space: bool = False  # FlatQuant with an FP prefix: cached K/V mapped back by P^-1
    interpret: bool | None = None  # Pallas interpret mode for the kernels backend; None: on the CPU only
    kernels: str = "auto"  # Pallas GPU backend of the int4 GEMMs: "auto" | "mosaic" | "triton" (runtime/kernel_choice.py)

    def act_spec(self, site: str) -> ActSpec | None:
        return dict(self.act)[site]

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedLayer:
    """One decoder layer. qkv: [D, (H + 2 KV) hd]; o: [H hd, D]; gate_up: [D, 2F]; down: [F, D].
    act_scale: {site: f32 [1, 1]} for static activation sites only. k_/v_scale, k_/v_zero: f32 [KV] (static
    KV), empty [0] for dynamic KV. flat: FlatQuant's online factors and LAC logits (runtime/flat.py), {} else.
    qkv_bias: [(H + 2 KV) hd] in the compute dtype (config.attention_bias, Qwen2), added after the GEMM;
    q_norm, k_norm: [hd] (config.qk_norm, Qwen3), RMSNorm over each head before RoPE; None otherwise."""

    input_norm: jax.Array
    post_norm: jax.Array
    qkv: QArray
    o: QArray
    gate_up: QArray
    down: QArray
    act_scale: dict
    k_scale: jax.Array
    k_zero: jax.Array
    v_scale: jax.Array
    v_zero: jax.Array
    flat: dict
    qkv_bias: jax.Array | None = None
    q_norm: jax.Array | None = None
    k_norm: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedModel:
    """The whole packed model; `spec` is static. prefix_k/v: per layer f32 [P, KV, hd] (empty lists when P = 0)."""

    embed: jax.Array
    final_norm: jax.Array
    lm_head: jax.Array | None
    layers: list
    prefix_k: list
    prefix_v: list
    spec: RuntimeSpec = dataclasses.field(metadata={"static": True})

    @property
    def config(self) -> ModelConfig:
        return self.spec.config

    @property
    def dtype(self):
        return self.spec.compute_dtype


def default_backend() -> str:
    """"kernels" on a GPU (Pallas compiles there), else "xla"."""
    return "kernels" if jax.default_backend() in ("gpu", "cuda", "rocm") else "xla"


def runtime_spec(qm, backend: str | None = None, dtype=None, kernels: str = "auto") -> RuntimeSpec:
    """Check that the integer runtime can run `qm`'s preset and describe it; UserError (one line) if not.
    kernels: the GEMMs' Pallas backend (RuntimeSpec.kernels)."""
    if kernels not in KERNELS:
        raise UserError(f"unknown RuntimeSpec.kernels {kernels!r} (one of {', '.join(KERNELS)})", "RuntimeSpec.kernels")
    preset = qm.preset
    name = getattr(preset, "name", "?")
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise UserError(f"unknown runtime backend {backend!r} (one of {', '.join(BACKENDS)})")
    recipe = qm.model.layers[0].recipe
    unsupported = f"preset {name!r} cannot run on the real int4 backend:"
    method = getattr(preset, "method", "prefixquant")
    flat = method == "flatquant"
    if flat:
        from prefixquant_jax.flatquant.recipe import FlatQuantRecipe
        if type(recipe) is not FlatQuantRecipe or not recipe.merged:
            raise UserError(f"{unsupported} its FlatQuant transforms are not merged into the weights (flatquant.merge_model)")
    elif recipe is not None and type(recipe) is not QuantRecipe:
        raise UserError(f"{unsupported} method {method!r} has online transforms the int4 runtime does not implement "
                        "(use backend 'fake', the fake-quant model)", "backend 'fake'")
    if recipe is None or recipe.weight is None:
        raise UserError(f"{unsupported} its weights are not quantized (use backend 'fake', the fake-quant model)",
                        "backend 'fake'")
    w = recipe.weight
    if w.bits not in (4, 8) or w.granularity != "channel" or not w.symmetric:
        raise UserError(f"{unsupported} weights must be symmetric per-channel 4 or 8 bits, got {w.bits} bits {w.granularity}")
    act = []
    for site in ACT_SITES:
        s = recipe.spec(site)
        if s is None:
            act.append((site, None))
            continue
        if s.bits not in (4, 8) or not s.symmetric or s.granularity != ("token" if s.dynamic else "tensor"):
            raise UserError(f"{unsupported} activation site {site} must be symmetric 4 or 8 bits, static per tensor or "
                            f"dynamic per token, got {s.bits} bits {s.granularity}{' dynamic' if s.dynamic else ''}")
        act.append((site, ActSpec(bits=s.bits, dynamic=s.dynamic, clip_ratio=s.clip_ratio, full_grid=s.full_grid)))
    kv = [recipe.spec(s) for s in ("k_cache", "v_cache")]
    if any(s is None for s in kv):
        raise UserError(f"{unsupported} its KV cache is not quantized (the runtime stores an integer KV cache)")
    if (any(s.symmetric or s.granularity != ("token" if s.dynamic else "head") for s in kv)
            or kv[0].dynamic != kv[1].dynamic or kv[0].clip_ratio != kv[1].clip_ratio):
        raise UserError(f"{unsupported} its K and V caches must be asymmetric, static per head or dynamic per "
                        f"(token, head), got {kv[0].granularity}/{kv[1].granularity}")
    if kv[0].bits != kv[1].bits or kv[0].bits not in (4, 8):
        raise UserError(f"{unsupported} KV bits must be 4 or 8, got {kv[0].bits}/{kv[1].bits}")
    P = 0 if qm.prefix_kv is None else qm.prefix_kv.length
    dt = jnp.dtype(dtype or qm.model.dtype).name
    return RuntimeSpec(config=qm.config, w_bits=w.bits, act=tuple(act), kv_bits=kv[0].bits, kv_dynamic=kv[0].dynamic,
                       kv_clip=kv[0].clip_ratio, r3=not flat and recipe.r3, r4=not flat and recipe.r4, prefix_len=P,
                       backend=backend, dtype=dt, preset=name, flat=flat,
                       kv_original_space=flat and recipe.kv_original_space, kernels=kernels)


def weight_qarray(kernel, scale, spec: QuantSpec) -> QArray:
    """The codes of a float kernel [in, out] under its scale [1, out], from the fake model's own encoder
    (quant.qarray.quantize), 4-bit codes packed two per byte along `in` (the kernels' layout)."""
    if spec.bits == 4 and kernel.shape[0] % 2:
        raise UserError(f"int4 weights need an even input size, got {kernel.shape[0]}")
    return quantize(jnp.asarray(kernel, jnp.float32), spec.replace(dynamic=False),
                    scale=jnp.asarray(scale, jnp.float32).reshape(1, -1)).pack(axis=0)


def _qp(blk, where: str, i: int):
    """(scale, zero point or None) as float32 of the static quantizer at `where` (a site or a linear)."""
    if where not in blk.qparams:
        raise UserError(f"layer {i} has no quantizer parameters at {where!r} (an uncalibrated model?); the real backend "
                        "needs them")
    scale, zero = static_qparams(blk.qparams, where)
    return jnp.asarray(scale, jnp.float32), (None if zero is None else jnp.asarray(zero, jnp.float32))


def _pack_layer(blk, spec: RuntimeSpec, i: int, stored: dict) -> PackedLayer:
    cdt = spec.compute_dtype

    def wq(name):
        kernel, scale = blk.linear_module(name).kernel[...], _qp(blk, name, i)[0]
        q = stored.get((i, name))
        if (q is not None and q.bits == spec.w_bits and (q.bits == 8 or q.packed_axis == 0)
                and np.array_equal(np.asarray(q.scale), np.maximum(np.asarray(scale), EPS))
                and np.array_equal(np.asarray(q.dequantize(kernel.dtype)), np.asarray(kernel))):
            return q  # the loaded checkpoint's codes, as stored (the model still holds exactly them)
        return weight_qarray(kernel, scale, blk.recipe.weight)

    act_scale = {}
    for site, a in spec.act:
        if a is not None and not a.dynamic:
            act_scale[site] = jnp.maximum(_qp(blk, site, i)[0], EPS).reshape(1, 1)
    kv = {}
    for s in ("k", "v"):
        if spec.kv_dynamic:  # computed per token at write time and kept in the cache
            kv[s + "_scale"] = kv[s + "_zero"] = jnp.zeros((0,), jnp.float32)
            continue
        scale, z = _qp(blk, s + "_cache", i)
        kv[s + "_scale"] = jnp.maximum(scale, EPS).reshape(-1)
        z = jnp.zeros_like(kv[s + "_scale"]) if z is None else z
        kv[s + "_zero"] = jnp.round(z).reshape(-1)
    a = blk.attn
    fam = {}
    if a.q.bias is not None:
        fam["qkv_bias"] = jnp.concatenate([jnp.asarray(getattr(a, n).bias[...], cdt) for n in ("q", "k", "v")])
    if a.q_norm is not None:
        fam["q_norm"], fam["k_norm"] = (jnp.asarray(nm.weight[...], cdt) for nm in (a.q_norm, a.k_norm))
    return PackedLayer(input_norm=jnp.asarray(blk.input_norm.weight[...], cdt),
                       post_norm=jnp.asarray(blk.post_norm.weight[...], cdt),
                       qkv=concatenate([wq("q"), wq("k"), wq("v")], axis=1), o=wq("o"),
                       gate_up=concatenate([wq("gate"), wq("up")], axis=1), down=wq("down"), act_scale=act_scale,
                       flat=layer_params(blk, blk.recipe) if spec.flat else {}, **kv, **fam)


def pack(qm, backend: str | None = None, dtype=None, prefix_kv=None, kernels: str = "auto") -> PackedModel:
    """PackedModel of QuantizedModel `qm` (its model's qparams and prefix KV; `prefix_kv` overrides the latter).

    backend: "kernels" | "xla" | None (default_backend()). dtype: compute dtype (default: the model's).
    kernels: "auto" | "mosaic" | "triton", the GEMMs' Pallas backend (runtime/kernel_choice.py)."""
    if prefix_kv is not None:
        qm = dataclasses.replace(qm, prefix_kv=prefix_kv)
    spec = runtime_spec(qm, backend, dtype, kernels)
    m, c = qm.model, qm.config
    layers = [_pack_layer(b, spec, i, qm.weights) for i, b in enumerate(m.layers)]
    pk, pv = [], []
    if qm.prefix_kv is not None:
        for a in qm.prefix_kv.k:
            pk.append(jnp.asarray(np.asarray(a)[0], jnp.float32))
        for a in qm.prefix_kv.v:
            pv.append(jnp.asarray(np.asarray(a)[0], jnp.float32))
        if len(pk) != c.num_layers or pk[0].shape != (spec.prefix_len, c.num_kv_heads, c.head_dim):
            raise UserError(f"prefix KV has {len(pk)} layers of {tuple(pk[0].shape) if pk else ()}; the model needs "
                            f"{c.num_layers} of {(spec.prefix_len, c.num_kv_heads, c.head_dim)}")
    cdt = spec.compute_dtype
    return PackedModel(embed=jnp.asarray(m.embed[...], cdt), final_norm=jnp.asarray(m.final_norm.weight[...], cdt),
                       lm_head=None if m.lm_head is None else jnp.asarray(m.lm_head[...], cdt),
                       layers=layers, prefix_k=pk, prefix_v=pv, spec=spec)
