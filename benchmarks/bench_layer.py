"""Time one Llama-3-8B-shaped decoder layer: the real int4 runtime vs the bf16 XLA layer, side by side.

Usage:
    python benchmarks/bench_layer.py [--json out.json|-] [--iters 20] [--warmup 3] [--a-bits 4|8] [--dynamic]
                                     [--kernels auto|mosaic|triton]
    python benchmarks/bench_layer.py --allow-cpu     # tiny shapes, Pallas in interpret mode: checks the script only

Model: one decoder layer with hidden 4096, 32 heads, 8 KV heads, head_dim 128, ffn 14336 and random weights,
behind a 4-token FP prefix (the vocabulary is cut to 256, so embedding and head are negligible beside the layer).
The fake-quant model (W4 per-channel RTN codes, A`a_bits` static per tensor or --dynamic per token, static
per-head int4 KV, R3 + R4 online) is packed by `prefixquant_jax.runtime.pack` into the real integer model: the
same Decoder over packed codes and an integer KV cache, backend "kernels" (RMSNorm -> rotate_quant -> W4A4
(--a-bits 8: W4A8) GEMM -> RoPE -> R3 Hadamard -> int4 KV -> attention (prefill: jnp over the dequantized
cache; decode: decode_attention) -> ... -> R4 fused in rotate_quant -> down GEMM). Baseline: the same weights
as the FP Decoder (no recipe) in bf16, plain XLA, with a bf16 cache. Cases:
  * prefill: 2048 tokens (batch 1) behind the prefix, writing the KV cache
  * decode:  one token after a 2048-token KV cache (int4 for the real model, bf16 for the baseline)
Both are timed through the jitted `prefixquant_jax.eval.forward.logits(graphdef, state, tokens, cache)` (the
cache is not donated: each call copies it once, a few MB, in both models).
"speedup" = bf16 ms / real ms (> 1: the int4 layer is faster).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._timing import add_common_args, on_gpu_or_allowed, timeit, write_json  # noqa: E402

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefixquant_jax.eval import forward
from prefixquant_jax.nn.cache import PrefixKV
from prefixquant_jax.nn.config import ModelConfig
from prefixquant_jax.nn.decoder import WEIGHT_NAMES, Decoder, rope_tables
from prefixquant_jax.pipeline.result import QuantizedModel
from prefixquant_jax.presets import preset
from prefixquant_jax.quant.recipe import ACT_SITES
from prefixquant_jax.runtime.cache import QuantKV
from prefixquant_jax.runtime.pack import pack

LLAMA3_8B_LAYER = ModelConfig(vocab_size=256, hidden_size=4096, intermediate_size=14336, num_layers=1, num_heads=32,
                              num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192)
TINY_LAYER = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=256)
PREFIX_LEN = 4


def build_recipe(a_bits: int, dynamic: bool):
    """The benchmarked quantization: W4, A`a_bits` static per tensor (or dynamic per token, no clip), static
    per-head asymmetric int4 KV, R3 + R4 online (PrefixQuant's w4a4kv4-static with those changes)."""
    r = preset("w4a4kv4-static", a_bits=a_bits)
    if dynamic:
        r = r.replace(sites=tuple((s, spec.replace(granularity="token", dynamic=True) if s in ACT_SITES else spec)
                                  for s, spec in r.sites))
    return r.replace(name=f"bench-w4a{a_bits}kv4-{'dynamic' if dynamic else 'static'}")


def build(config: ModelConfig, recipe, P: int = PREFIX_LEN, seed: int = 0):
    """(the bf16 FP Decoder, the float32 fake-quant QuantizedModel) of one set of random weights behind the same
    random P-row FP prefix. Quantizers: weight scales amax / 7 per output channel, static activation scales 0.5,
    KV scale 0.25 and zero point 8 per head (any valid scales run the same integer pipeline)."""
    D, F, H, KV, hd, V = (config.hidden_size, config.intermediate_size, config.num_heads, config.num_kv_heads,
                          config.head_dim, config.vocab_size)
    shapes = {"q": (D, H * hd), "k": (D, KV * hd), "v": (D, KV * hd), "o": (H * hd, D),
              "gate": (D, F), "up": (D, F), "down": (F, D)}
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes) + 4)
    w = {n: jax.random.normal(k, s, jnp.float32) / np.sqrt(s[0]) for k, (n, s) in zip(keys, shapes.items())}
    one = jnp.ones((D,), jnp.float32)
    layer = {"input_norm": one, "post_norm": one, "attn": {n: w[n] for n in ("q", "k", "v", "o")},
             "mlp": {n: w[n] for n in ("gate", "up", "down")}}
    params = {"embed": jax.random.normal(keys[-4], (V, D), jnp.float32), "final_norm": one,
              "lm_head": jax.random.normal(keys[-3], (D, V), jnp.float32) / np.sqrt(D), "layers": {0: layer}}
    prefix = PrefixKV(k=[jax.random.normal(keys[-2], (P, KV, hd), jnp.float32)],
                      v=[jax.random.normal(keys[-1], (P, KV, hd), jnp.float32)],
                      prefix_ids=tuple(range(1, P + 1)), k_rotated=recipe.rotate)
    fp = Decoder(config, params, jnp.bfloat16, prefix=prefix)
    model = Decoder(config, params, jnp.float32, recipe=recipe, prefix=prefix)
    blk = model.layers[0]
    for n in WEIGHT_NAMES:
        blk.set_quantizer(n, jnp.max(jnp.abs(w[n]), axis=0, keepdims=True) / 7.0)
    for site, spec in recipe.sites:
        if spec.dynamic:
            continue
        if site in ACT_SITES:
            blk.set_quantizer(site, jnp.full((1, 1, 1), 0.5, jnp.float32))
        else:
            blk.set_quantizer(site, jnp.full((KV, 1), 0.25, jnp.float32), jnp.full((KV, 1), 8.0, jnp.float32))
    return fp, QuantizedModel(model=model, report={})


def packed(qm, backend: str = "kernels", dtype=jnp.bfloat16, kernels: str = "auto", interpret=None):
    """The real integer model of `qm` (runtime/pack.py): a Decoder over packed codes."""
    return pack(qm, backend=backend, dtype=dtype, kernels=kernels, interpret=interpret)


def case_shapes(case: str, L: int, T: int) -> tuple[int, int]:
    """(new tokens, cached tokens) of a "prefill" (L tokens) or "decode" (1 after T) case."""
    return (L, 0) if case == "prefill" else (1, T)


def filled_cache(model, n_new: int, cached: int, key):
    """model.init_cache for the case with its first `cached` rows random (int4 codes for the real model, bf16
    for the baseline) and the position after them."""
    cache = model.init_cache(1, cached + n_new)
    kv = []
    for i, layer in enumerate(cache.kv):
        kk, kv_key = jax.random.split(jax.random.fold_in(key, i))
        if isinstance(layer, QuantKV):
            rand = lambda k, a: jax.random.randint(k, a.shape, -128, 128, jnp.int32).astype(a.dtype)  # noqa: E731
        else:
            rand = lambda k, a: jax.random.normal(k, a.shape, a.dtype)  # noqa: E731
        kv.append(dataclasses.replace(layer, k=rand(kk, layer.k), v=rand(kv_key, layer.v)))
    return dataclasses.replace(cache, kv=kv, pos=cache.pos + cached)


def layer_fn(model):
    """(jitted f(state, x, kv, pos) -> (y, kv): the model's one block on hidden states x at pos.., its state)."""
    graphdef, state = nnx.split(model.layers[0])
    config = model.config

    @jax.jit
    def f(state, x, kv, pos):
        cos, sin = rope_tables(config, pos + jnp.arange(x.shape[1]))
        return nnx.merge(graphdef, state)(x, kv, pos, cos, sin)

    return f, state


def check_against_xla(qm, n_new: int, cached: int, key, kernels_choice: str = "auto") -> dict:
    """The kernels layer against the same integer pipeline through the kernels' jnp references (backend "xla"),
    both in float32: ||d_k - d_x|| / ||d_x|| of the layer's update d = y - x (the residual x would hide it), and
    the fraction of equal KV codes in the rows written. On the CPU (interpret mode) both are exact (0 and 1). On a
    GPU the kernels' f32 dots run in TF32, so the odd activation or KV code near a rounding tie flips, and each
    flip moves the update by up to one quantization step: small, not 0. (In bfloat16 the two differ more by
    design: the fused kernel quantizes the f32 R4 rotation at down_in, the jnp path rounds it to bf16 first, as
    the fake-quant model does.)"""
    kernels, xla = packed(qm, "kernels", jnp.float32, kernels_choice), packed(qm, "xla", jnp.float32)
    ck = filled_cache(kernels, n_new, cached, key)
    cx = xla.init_cache(1, cached + n_new)  # the same cached codes (the kernels cache has more, unread rows)
    cx = dataclasses.replace(cx, pos=ck.pos, kv=[dataclasses.replace(a, k=b.k[:, :a.rows], v=b.v[:, :a.rows])
                                                 for a, b in zip(cx.kv, ck.kv)])
    x = jax.random.normal(jax.random.fold_in(key, 99), (1, n_new, qm.config.hidden_size), jnp.float32)
    (fk, sk), (fx, sx) = layer_fn(kernels), layer_fn(xla)
    (yk, kvk), (yx, kvx) = fk(sk, x, ck.kv[0], ck.pos), fx(sx, x, cx.kv[0], cx.pos)
    dk, dx = yk - x, yx - x
    rows = slice(cached, cached + n_new)
    equal = np.mean([np.mean(np.asarray(a[:, rows]) == np.asarray(b[:, rows])) for a, b in ((kvk.k, kvx.k), (kvk.v, kvx.v))])
    return {"update_rel_err_vs_xla": float(jnp.linalg.norm(dk - dx) / jnp.linalg.norm(dx)),
            "kv_codes_equal_vs_xla": float(equal)}


def bench(config: ModelConfig, L: int, T: int, P: int, opt) -> list[dict]:
    """Prefill of L tokens and a decode step after T cached tokens (both behind P prefix rows)."""
    fp, qm = build(config, build_recipe(opt.a_bits, opt.dynamic), P)
    real = packed(qm, "kernels", jnp.bfloat16, opt.kernels)
    g_real, s_real = nnx.split(real)
    g_fp, s_fp = nnx.split(fp)
    key = jax.random.PRNGKey(1)
    rows = []
    for case in ("prefill", "decode"):
        n_new, cached = case_shapes(case, L, T)
        tokens = jax.random.randint(jax.random.fold_in(key, 7), (1, n_new), 0, config.vocab_size, jnp.int32)
        c_real, c_fp = filled_cache(real, n_new, cached, key), filled_cache(fp, n_new, cached, key)
        t_real = timeit(forward.logits, g_real, s_real, tokens, c_real, iters=opt.iters, warmup=opt.warmup)
        t_fp = timeit(forward.logits, g_fp, s_fp, tokens, c_fp, iters=opt.iters, warmup=opt.warmup)
        err = check_against_xla(qm, n_new, cached, key, opt.kernels)
        D, KV, hd = config.hidden_size, config.num_kv_heads, config.head_dim
        rows.append({"case": case, "tokens": n_new, "cached": cached, "prefix": P, "hidden": D,
                     "ffn": config.intermediate_size, "heads": config.num_heads, "kv_heads": KV, "head_dim": hd,
                     "a_bits": opt.a_bits, "dynamic": opt.dynamic, "kernels": opt.kernels, "real_ms": t_real,
                     "bf16_ms": t_fp, "speedup": t_fp / t_real, **err})
        r = rows[-1]
        print(f"{case:<8} new {n_new:<5} cached {cached:<5} prefix {P}  real int4 {t_real:.3f} ms  bf16 {t_fp:.3f} ms  "
              f"speedup {r['speedup']:.2f}x  | vs xla backend: update rel err {err['update_rel_err_vs_xla']:.2e}, "
              f"KV codes equal {err['kv_codes_equal_vs_xla']:.4f}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, iters=20, warmup=3)
    ap.add_argument("--a-bits", type=int, default=4, choices=(4, 8), help="activation bits (8: W4A8 GEMM)")
    ap.add_argument("--dynamic", action="store_true", help="per-token dynamic activation scales (default: static)")
    ap.add_argument("--kernels", default="auto", choices=("auto", "mosaic", "triton"),
                    help="the int4 GEMMs' Pallas GPU backend (runtime/kernel_choice.py)")
    opt = ap.parse_args(argv)

    backend = jax.default_backend()
    gpu = on_gpu_or_allowed("bench_layer", opt.allow_cpu)
    if gpu is None:
        return 0
    if not gpu:
        opt.iters, opt.warmup = 1, 1
        config, L, T = TINY_LAYER, 32, 32
    else:
        config, L, T = LLAMA3_8B_LAYER, 2048, 2048
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({backend}), jax {jax.__version__}, iters {opt.iters}, "
          f"W4A{opt.a_bits}KV4 {'dynamic' if opt.dynamic else 'static'}, kernels {opt.kernels}")
    rows = bench(config, L, T, PREFIX_LEN, opt)
    if opt.json:
        doc = {"device": dev.device_kind, "backend": backend, "jax": jax.__version__, "iters": opt.iters, "results": rows}
        write_json(doc, opt.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
