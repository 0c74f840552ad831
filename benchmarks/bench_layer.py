"""Time one Llama-3-8B-shaped decoder layer: the real int4 runtime vs the bf16 XLA layer, side by side.

Usage:
    python benchmarks/bench_layer.py [--json out.json|-] [--iters 20] [--warmup 3] [--a-bits 4|8] [--dynamic]
    python benchmarks/bench_layer.py --allow-cpu     # tiny shapes, Pallas in interpret mode: checks the script only

Layer: hidden 4096, 32 heads, 8 KV heads, head_dim 128, ffn 14336, random weights (the bf16 ones, and
their per-channel int4 RTN codes for the real layer). Cases:
  * prefill: 2048 tokens (batch 1) behind a 4-token FP prefix, writing the KV cache
  * decode:  one token after a 2048-token KV cache (int4 for the real layer, bf16 for the baseline)
             plus the 4-token FP prefix
Real layer (prefixquant_jax.runtime.model.layer, backend "kernels"): RMSNorm -> rotate_quant (static
per-tensor, or --dynamic per-token) -> W4A4 (or --a-bits 8: W4A8) GEMM -> RoPE -> R3 Hadamard -> int4
KV -> attention (prefill: jnp over the dequantized cache; decode: decode_attention) -> ... -> R4 fused in
rotate_quant -> down GEMM. Baseline: prefixquant_jax.model.Block with no recipe in bf16 (plain XLA).
Caches are not donated (each call copies its cache once, a few MB, in both layers).
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

from prefixquant_jax.nn.config import ModelConfig
from prefixquant_jax.quant.recipe import ACT_SITES


def build_spec(config: ModelConfig, P: int, a_bits: int, dynamic: bool, backend: str, interpret=None):
    """RuntimeSpec of the benchmarked layer: W4, A`a_bits` (static or dynamic), static per-head int4 KV, R3 + R4."""
    from prefixquant_jax.runtime.pack import ActSpec, RuntimeSpec

    act = tuple((s, ActSpec(bits=a_bits, dynamic=dynamic)) for s in ACT_SITES)
    return RuntimeSpec(config=config, w_bits=4, act=act, kv_bits=4, kv_dynamic=False, kv_clip=1.0, r3=True, r4=True,
                       prefix_len=P, backend=backend, dtype="bfloat16", preset="bench", interpret=interpret)


def build(config: ModelConfig, spec, seed: int = 0):
    """(bf16 params dict of one layer, the PackedLayer of its int4 RTN weights) for a RuntimeSpec of build_spec."""
    from prefixquant_jax.quant.qarray import concatenate
    from prefixquant_jax.quant.spec import QuantSpec
    from prefixquant_jax.runtime.pack import PackedLayer, weight_qarray

    D, F, H, KV, hd = (config.hidden_size, config.intermediate_size, config.num_heads, config.num_kv_heads,
                       config.head_dim)
    shapes = {"q": (D, H * hd), "k": (D, KV * hd), "v": (D, KV * hd), "o": (H * hd, D),
              "gate": (D, F), "up": (D, F), "down": (F, D)}
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    w = {n: (jax.random.normal(k, s, jnp.float32) / np.sqrt(s[0])) for k, (n, s) in zip(keys, shapes.items())}
    w4 = QuantSpec(bits=4, granularity="channel")
    q = {n: weight_qarray(a, jnp.max(jnp.abs(a), axis=0, keepdims=True) / 7.0, w4) for n, a in w.items()}

    def cat(names):
        return concatenate([q[n] for n in names], axis=1)

    dynamic = all(a is None or a.dynamic for _, a in spec.act)
    one, kv = jnp.ones((D,), jnp.bfloat16), jnp.full((KV,), 0.25, jnp.float32)
    lp = PackedLayer(input_norm=one, post_norm=one, qkv=cat(["q", "k", "v"]), o=q["o"], gate_up=cat(["gate", "up"]),
                     down=q["down"], act_scale={} if dynamic else {s: jnp.full((1, 1), 0.5, jnp.float32) for s in ACT_SITES},
                     k_scale=kv, k_zero=jnp.full((KV,), 8.0, jnp.float32), v_scale=kv, v_zero=jnp.full((KV,), 8.0, jnp.float32),
                     flat={})
    params = {"input_norm": one, "post_norm": one,
              "attn": {n: w[n].astype(jnp.bfloat16) for n in ("q", "k", "v", "o")},
              "mlp": {n: w[n].astype(jnp.bfloat16) for n in ("gate", "up", "down")}}
    return params, lp


def real_layer(config: ModelConfig, spec):
    """Jitted real int4 layer f(lp, x [1, L, D], k codes, v codes, prefix_k, prefix_v, row) -> (x, (kc, vc))."""
    from prefixquant_jax.model import rope_tables
    from prefixquant_jax.runtime.model import layer

    @jax.jit
    def real(lp, x, kc, vc, pk, pv, row):
        cos, sin = rope_tables(config, spec.prefix_len + row + jnp.arange(x.shape[1]))
        y, kv = layer(spec, lp, x, (kc, vc, None, None), pk, pv, row, cos, sin)
        return y, kv[:2]

    return real


def case_shapes(config: ModelConfig, case: str, L: int, T: int):
    """(new tokens, cached rows, rows of the int4 cache) of a "prefill" (L tokens) or "decode" (1 after T) case."""
    from prefixquant_jax.runtime.model import cache_rows

    n_new, cached = (L, 0) if case == "prefill" else (1, T)
    return n_new, cached, cache_rows(cached + n_new)


def bench(config: ModelConfig, L: int, T: int, P: int, opt) -> list[dict]:
    """Prefill of L tokens and a decode step after T cached tokens (both behind P prefix rows)."""
    from flax import nnx

    from prefixquant_jax.model import Block, rope_tables

    spec = build_spec(config, P, opt.a_bits, opt.dynamic, "kernels")
    params, lp = build(config, spec)
    real = real_layer(config, spec)
    # numerics check in float32: the kernels against the kernels' jnp references (the "xla" backend)
    real_f32 = real_layer(config, dataclasses.replace(spec, dtype="float32"))
    real_xla_f32 = real_layer(config, dataclasses.replace(spec, dtype="float32", backend="xla"))
    KV, hd, D = config.num_kv_heads, config.head_dim, config.hidden_size
    ks = jax.random.split(jax.random.PRNGKey(1), 6)
    pk = jax.random.normal(ks[0], (P, KV, hd), jnp.float32)
    pv = jax.random.normal(ks[1], (P, KV, hd), jnp.float32)

    graphdef, state = nnx.split(Block(config, params, jnp.bfloat16))

    @jax.jit
    def fp(state, x, ck, cv, offset):
        cos, sin = rope_tables(config, offset + jnp.arange(x.shape[1]))
        return nnx.merge(graphdef, state)(x, ck, cv, offset, cos, sin)

    rows = []
    for case in ("prefill", "decode"):
        n_new, cached, Tr = case_shapes(config, case, L, T)
        x = jax.random.normal(ks[2], (1, n_new, D), jnp.bfloat16)
        kc = jax.random.randint(ks[3], (1, Tr, KV, hd // 2), -128, 128, jnp.int32).astype(jnp.int8)
        vc = jax.random.randint(ks[4], (1, Tr, KV, hd // 2), -128, 128, jnp.int32).astype(jnp.int8)
        fcache = jax.random.normal(ks[5], (1, P + cached + n_new, KV, hd), jnp.bfloat16)
        t_real = timeit(real, lp, x, kc, vc, pk, pv, cached, iters=opt.iters, warmup=opt.warmup)
        t_fp = timeit(fp, state, x, fcache, fcache, P + cached, iters=opt.iters, warmup=opt.warmup)
        err = check_against_xla(real_f32, real_xla_f32, (lp, x.astype(jnp.float32), kc, vc, pk, pv, cached), cached,
                                n_new)
        rows.append({"case": case, "tokens": n_new, "cached": cached, "prefix": P, "hidden": D,
                     "ffn": config.intermediate_size, "heads": config.num_heads, "kv_heads": KV, "head_dim": hd, "a_bits": opt.a_bits,
                     "dynamic": opt.dynamic, "real_ms": t_real, "bf16_ms": t_fp, "speedup": t_fp / t_real, **err})
        r = rows[-1]
        print(f"{case:<8} new {n_new:<5} cached {cached:<5} prefix {P}  real int4 {t_real:.3f} ms  bf16 {t_fp:.3f} ms  "
              f"speedup {r['speedup']:.2f}x  | vs xla backend: update rel err {err['update_rel_err_vs_xla']:.2e}, "
              f"KV codes equal {err['kv_codes_equal_vs_xla']:.4f}", flush=True)
    return rows


def check_against_xla(real, real_xla, args, row: int, n_new: int) -> dict:
    """The kernels layer against the same integer pipeline through the kernels' jnp references, both in
    float32: ||d_k - d_x|| / ||d_x|| of the layer's update d = y - x (the residual x would hide it), and
    the fraction of equal KV codes in the rows written. On the CPU (interpret mode) both are exact (0 and
    1). On a GPU the kernels' f32 dots run in TF32, so the odd activation or KV code near a rounding tie
    flips, and each flip moves the update by up to one quantization step: small, not 0. (In bfloat16 the
    two differ more by design: the fused kernel quantizes the f32 R4 rotation at down_in, the jnp path
    rounds it to bf16 first, as the fake-quant model does.)"""
    x = args[1].astype(jnp.float32)
    (yk, kvk), (yx, kvx) = real(*args), real_xla(*args)
    dk, dx = yk.astype(jnp.float32) - x, yx.astype(jnp.float32) - x
    rows = slice(row, row + n_new)
    equal = np.mean([np.mean(np.asarray(a[:, rows]) == np.asarray(b[:, rows])) for a, b in zip(kvk, kvx)])
    return {"update_rel_err_vs_xla": float(jnp.linalg.norm(dk - dx) / jnp.linalg.norm(dx)),
            "kv_codes_equal_vs_xla": float(equal)}


LLAMA3_8B_LAYER = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=1, num_heads=32,
                              num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, iters=20, warmup=3)
    ap.add_argument("--a-bits", type=int, default=4, choices=(4, 8), help="activation bits (8: W4A8 GEMM)")
    ap.add_argument("--dynamic", action="store_true", help="per-token dynamic activation scales (default: static)")
    opt = ap.parse_args(argv)

    backend = jax.default_backend()
    gpu = on_gpu_or_allowed("bench_layer", opt.allow_cpu)
    if gpu is None:
        return 0
    if not gpu:
        opt.iters, opt.warmup = 1, 1
        config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                             num_kv_heads=2, head_dim=16, max_position_embeddings=256)
        L, T = 32, 32
    else:
        config = LLAMA3_8B_LAYER
        L, T = 2048, 2048
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({backend}), jax {jax.__version__}, iters {opt.iters}, "
          f"W4A{opt.a_bits}KV4 {'dynamic' if opt.dynamic else 'static'}")
    rows = bench(config, L, T, 4, opt)
    if opt.json:
        doc = {"device": dev.device_kind, "backend": backend, "jax": jax.__version__, "iters": opt.iters, "results": rows}
        write_json(doc, opt.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
