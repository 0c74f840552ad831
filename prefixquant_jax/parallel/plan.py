"""`prefixquant plan`: per-device bytes of each pipeline stage for a model and a mesh, without reading a weight.

The model is only its config: a built-in name (`BUILTIN`: llama-3-8b, llama-3-70b, qwen2.5-32b, ...), an HF
directory's config.json, a GGUF file's metadata, or a bundled name. Every array is a `jax.ShapeDtypeStruct`:
the fake-quant model is built by `nnx.eval_shape` from abstract params, the packed int4 model by
`jax.eval_shape(runtime.pack)`, the KV caches by `jax.eval_shape` of their constructors; each leaf gets the
`NamedSharding` that `sharding.py` gives it on a `jax.sharding.AbstractMesh` of the requested shape, and a
device's bytes are the sum of its shards (`NamedSharding.shard_shape`). So the weight rows are exactly the
bytes `addressable_shards` hold on a real mesh (tests/parallel/test_plan.py checks it on a tiny model, 2 x 2 mesh).

Stages (per device; `weights` and `kv_cache` exact, `activations` an estimate of the largest live set, formulas below):
  load         the FP model's params in --dtype, split over `model` (eval --mesh puts them there from the host).
  calibration  one block, FP and quantized copies (float32), plus the calibration samples' activations on
               that block: samples/data rows x seqlen.
  training     one block: trainable weights + their gradients + Adam's two moments (4 x the block, float32)
               + the FP block, plus one batch (batch/data rows x seqlen) forward and backward.
  eval         the whole fake-quant model with its FP prefix K/V (model state, not in a cache), its float KV
               cache of batch/data rows x seqlen, the logits [rows, seqlen, vocab] float32 and one block's
               activations.
  runtime      the packed int4 model (codes, scales, FP embeddings/head in --dtype, the FP prefix KV), its
               integer KV cache and one block's activations.
Activations of a block on r rows x L tokens (float32, `model`-split widths divided by M):
  r L (6 D + (H + 2 KV) hd / M + 3 F / M) + r (H / M) min(L, 512) (P + L)        (x, norms, residuals, q/k/v,
  gate/up/act, one query chunk's attention scores); training: twice that (saved for the backward) plus the
  batch's inputs and targets, 2 r L D.
Host memory is not planned stage by stage: the checkpoint is read one layer at a time (safetensors and GGUF),
but `quantize` holds the fake-quant model whole, its float32 kernels included (the `host` line says how much).
"""
from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding

from checkpoints_convert import BUNDLED, resolve_model_path
from checkpoints_convert.gguf_io import read_gguf_config
from checkpoints_convert.hf import expected_shapes, read_config
from checkpoints_convert.hub import parse_repo_id
from prefixquant_jax.checkpoint.fp import user_errors
from prefixquant_jax.errors import UserError
from prefixquant_jax.nn.cache import Cache, LayerKV
from prefixquant_jax.nn.config import ModelConfig
from prefixquant_jax.nn.decoder import WEIGHT_NAMES, Decoder
from prefixquant_jax.parallel.sharding import MeshSpec, batch_shardings, state_shardings
from prefixquant_jax.pipeline.result import QuantizedModel
from prefixquant_jax.presets import preset
from prefixquant_jax.quant.recipe import ACT_SITES
from prefixquant_jax.runtime.pack import pack

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA = dict(model_type="llama", vocab_size=128256, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
              max_position_embeddings=131072, rms_norm_eps=1e-5, num_key_value_heads=8, bos_token_id=128000,
              eos_token_id=128001)
_QWEN = dict(model_type="qwen2", vocab_size=152064, rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-6,
             num_key_value_heads=8, use_sliding_window=False)
# HF config.json fields of the models users quantize (from their published configs)
BUILTIN = {
    "llama-3-8b": dict(_LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32),
    "llama-3-70b": dict(_LLAMA, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64),
    "qwen2.5-32b": dict(_QWEN, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                        num_attention_heads=40),
    "qwen2.5-72b": dict(_QWEN, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                        num_attention_heads=64),
}
STAGES = ("load", "calibration", "training", "eval", "runtime")


def resolve_config(spec: str) -> tuple[ModelConfig, str]:
    """(config, where it came from) of a built-in name, a bundled name, an HF repo id or directory, or a GGUF file."""
    if spec in BUILTIN:
        return ModelConfig.from_hf_dict(BUILTIN[spec], source=spec), f"built-in {spec}"
    if spec not in BUNDLED and not os.path.exists(spec) and parse_repo_id(spec) is None:
        raise UserError(f"unknown model {spec!r}: not a built-in config ({', '.join(BUILTIN)}), a bundled name "
                        f"({', '.join(BUNDLED)}), a Hugging Face repo id org/name[@revision] or an existing path")
    with user_errors():
        path = resolve_model_path(spec)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
            source = os.path.join(path, "config.json")
            return ModelConfig.from_hf_dict(read_config(path), source=source), source
        if os.path.isdir(path):
            ggufs = [f for f in os.listdir(path) if f.endswith(".gguf")]
            if len(ggufs) != 1:
                raise UserError(f"{path}: no config.json and not exactly one .gguf file")
            path = os.path.join(path, ggufs[0])
        if not path.endswith(".gguf"):
            raise UserError(f"{path}: expected a .gguf file or a Hugging Face model directory")
        return ModelConfig.from_hf_dict(read_gguf_config(path), source=path), path


def abstract_params(config: ModelConfig, dtype=jnp.float32) -> dict:
    """The params dict (nn/decoder.py layout) as ShapeDtypeStructs."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype)), expected_shapes(config.to_hf_dict()),
                        is_leaf=lambda x: isinstance(x, tuple))


def _fill_qparams(model, recipe, config: ModelConfig) -> None:
    """The quantizer parameters calibration gives (shapes only): per-column weight scales [1, out], static
    activation scales [1, 1], static per-head KV scales and zero points [KV]."""
    f32 = jnp.float32
    for blk in model.layers:
        if recipe.weight is not None:
            for name in WEIGHT_NAMES:
                blk.set_quantizer(name, jnp.ones((1, blk.linear_module(name).kernel.shape[1]), f32))
        for site in ACT_SITES:
            s = recipe.spec(site)
            if s is not None and not s.dynamic:
                blk.set_quantizer(site, jnp.ones((1, 1), f32))
        for site in ("k_cache", "v_cache"):
            s = recipe.spec(site)
            if s is not None and not s.dynamic:
                zero = None if s.symmetric else jnp.zeros((config.num_kv_heads,), f32)
                blk.set_quantizer(site, jnp.ones((config.num_kv_heads,), f32), zero)


def abstract_state(config: ModelConfig, recipe=None, dtype=jnp.float32):
    """nnx state (ShapeDtypeStructs) of the model an evaluation runs: FP (recipe None or FP) or the fake-quant model
    of `recipe` with its calibrated qparams."""
    recipe = None if recipe is None or recipe.is_fp else recipe

    def build(params):
        m = Decoder(config, params, dtype, recipe)
        if recipe is not None:
            _fill_qparams(m, recipe, config)
        return m

    return nnx.split(nnx.eval_shape(build, abstract_params(config, dtype)))[1]


def abstract_packed(config: ModelConfig, recipe, dtype=jnp.bfloat16):
    """(nnx state, the model) (ShapeDtypeStructs) of the packed integer model of `recipe`, without the prefix
    (`prefix_bytes`)."""
    def build(params):
        m = Decoder(config, params, jnp.float32, recipe)
        _fill_qparams(m, recipe, config)
        return pack(QuantizedModel(model=m, report={}), backend="xla", dtype=dtype)

    model = nnx.eval_shape(build, abstract_params(config, jnp.float32))
    return nnx.split(model)[1], model


def device_bytes(mesh, tree, shardings) -> int:
    """Bytes one device holds of `tree` under `shardings` (every leaf's shard; replicated leaves whole)."""
    total = 0
    for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
        total += math.prod(s.shard_shape(tuple(a.shape))) * jnp.dtype(a.dtype).itemsize
    return total


def block_bytes(mesh, state, shardings, layer: int = 0) -> int:
    """Bytes one device holds of block `layer` of a model state."""
    sub = lambda t: t["layers"][layer]
    return device_bytes(mesh, sub(state), sub(shardings))


def activation_bytes(config: ModelConfig, rows: int, L: int, P: int, M: int) -> int:
    c = config
    per_token = 6 * c.hidden_size + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim // M + 3 * c.intermediate_size // M
    return 4 * (rows * L * per_token + rows * (c.num_heads // M) * min(L, 512) * (P + L))


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    preset: str = "w4a4kv4-static"
    dtype: str = "float32"  # load and eval
    runtime_dtype: str = "bfloat16"
    calib_samples: int = 32
    calib_seqlen: int = 512
    train_batch_size: int = 4
    train_seqlen: int = 1024
    batch_size: int = 1  # eval / runtime rows
    seqlen: int = 2048
    prefix_len: int | None = None  # default: 5 tokens for a prefix preset, else 0


def _rows(n: int, data: int) -> int:
    return -(-n // data)


def plan(spec: str, mesh_text: str | None, opts: PlanOptions = PlanOptions()) -> dict:
    """{"model", "config", "mesh", "stages": {stage: {"weights", "optimizer", "activations", "total"}}, "host"}."""
    config, source = resolve_config(spec)
    ms = MeshSpec.parse(mesh_text)
    D, M = (ms.data or 1), ms.model
    mesh = AbstractMesh((D, M), ("data", "model"))
    for what, n in (("attention heads", config.num_heads), ("KV heads", config.num_kv_heads),
                    ("MLP width", config.intermediate_size)):
        if n % M:
            raise UserError(f"--mesh model={M} does not divide the {what} ({n}) of {spec}")
    recipe = preset(opts.preset)
    P = opts.prefix_len if opts.prefix_len is not None else (5 if recipe.prefix else 0)
    dt, rdt = jnp.dtype(opts.dtype), jnp.dtype(opts.runtime_dtype)

    fp = abstract_state(config, None, dt)
    fp_sh = state_shardings(mesh, fp)
    fake = abstract_state(config, recipe, dt)
    fake_sh = state_shardings(mesh, fake)
    fp32_fake = abstract_state(config, recipe, jnp.float32)
    blk_q = block_bytes(mesh, fp32_fake, state_shardings(mesh, fp32_fake))
    fp32 = abstract_state(config, None, jnp.float32)
    blk_fp = block_bytes(mesh, fp32, state_shardings(mesh, fp32))
    stages = {}

    def stage(name, weights, optimizer=0, activations=0, kv_cache=0):
        stages[name] = dict(weights=int(weights), optimizer=int(optimizer), kv_cache=int(kv_cache),
                            activations=int(activations), total=int(weights + optimizer + kv_cache + activations))

    stage("load", device_bytes(mesh, fp, fp_sh))
    r, L = _rows(opts.calib_samples, D), opts.calib_seqlen
    stage("calibration", blk_fp + blk_q, 0, activation_bytes(config, r, L, P, M) + 3 * 4 * r * L * config.hidden_size)
    r, L = _rows(opts.train_batch_size, D), opts.train_seqlen
    stage("training", blk_fp + 2 * blk_q, 2 * blk_q,
          2 * activation_bytes(config, r, L, P, M) + 2 * 4 * r * L * config.hidden_size)
    r, L = _rows(opts.batch_size, D), opts.seqlen
    cache = jax.eval_shape(lambda: Cache(kv=[LayerKV.empty(config, opts.batch_size, L, dt)
                                             for _ in range(config.num_layers)], pos=jnp.zeros((), jnp.int32)))
    kv = device_bytes(mesh, cache, batch_shardings(mesh, cache))
    logits = 4 * r * L * config.vocab_size
    prefix = 2 * config.num_layers * P * config.num_kv_heads * config.head_dim * 4  # model state: f32, replicated
    stage("eval", device_bytes(mesh, fake, fake_sh) + prefix, 0, logits + activation_bytes(config, r, L, P, M), kv)
    if recipe.w_bits and recipe.method == "prefixquant" and recipe.kv_bits:
        pm, packed = abstract_packed(config, recipe, rdt)
        qcache = jax.eval_shape(lambda: packed.init_cache(opts.batch_size, L))
        runtime = device_bytes(mesh, pm, state_shardings(mesh, pm)) + prefix
        stage("runtime", runtime, 0, logits + activation_bytes(config, r, L, P, M),
              device_bytes(mesh, qcache, batch_shardings(mesh, qcache)))
    host = sum(math.prod(a.shape) * 4 for a in jax.tree.leaves(abstract_params(config)))
    return {"model": spec, "source": source, "preset": recipe.name, "prefix_len": P,
            "config": {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                                       "num_heads", "num_kv_heads", "head_dim")},
            "mesh": {"data": D, "model": M}, "options": dataclasses.asdict(opts), "stages": stages,
            "host_load_float32_bytes": int(host), "params": int(sum(math.prod(a.shape)
                                                                    for a in jax.tree.leaves(abstract_params(config))))}


def format_plan(p: dict, device_gib: float | None = None) -> str:
    g = lambda b: f"{b / 2**30:9.2f}"
    c, m = p["config"], p["mesh"]
    lines = [f"{p['model']} ({p['source']}): {p['params'] / 1e9:.2f} B params, {c['num_layers']} layers, "
             f"mesh data={m['data']} x model={m['model']}, preset {p['preset']} (prefix {p['prefix_len']})",
             f"{'stage':12s} {'weights':>9s} {'optim':>9s} {'kv cache':>9s} {'activ':>9s} {'total':>9s}  GiB per device"
             + ("" if device_gib is None else f"  (device {device_gib:g} GiB)")]
    for name, s in p["stages"].items():
        fits = "" if device_gib is None else ("  fits" if s["total"] <= device_gib * 2**30 else "  DOES NOT FIT")
        lines.append(f"{name:12s} {g(s['weights'])} {g(s['optimizer'])} {g(s['kv_cache'])} {g(s['activations'])} {g(s['total'])}{fits}")
    lines.append(f"host: quantize holds the fake-quant model in float32: {p['host_load_float32_bytes'] / 2**30:.1f} GiB")
    return "\n".join(lines)
