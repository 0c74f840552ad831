"""Block-wise trainer throughput: train steps/s of one decoder block (random weights, real shapes).

    python benchmarks/bench_train.py [--shape smollm2|llama3-8b] [--batch 4] [--seqlen 512] [--steps 10] [--json OUT]

Times the jitted train step of `prefixquant_jax.train` (w4a4kv4-static recipe: fake-quantized weights,
static A4 scales, static per-head KV4, R3/R4 Hadamards, a 4-token FP prefix; both parameter groups
trained) after one warm-up step (the compile), on whatever `jax.devices()` holds.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from prefixquant_jax.compiled_block import CompiledBlock
from prefixquant_jax.nn.config import ModelConfig
from prefixquant_jax.model import Block
from prefixquant_jax.prefix.prefix_kv import PrefixKV
from prefixquant_jax.quant.presets import get_preset
from prefixquant_jax.pipeline import init_weight_scales
from prefixquant_jax.train import BlockTrainer, TrainConfig, prefixquant_groups

SHAPES = {"smollm2": dict(hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3, head_dim=64),
          "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8, head_dim=128)}


def random_block(config, recipe, rng):
    D, F, H, KV, hd = (config.hidden_size, config.intermediate_size, config.num_heads, config.num_kv_heads, config.head_dim)
    w = lambda i, o: (rng.standard_normal((i, o)) / np.sqrt(i)).astype(np.float32)
    p = {"input_norm": np.ones(D, np.float32), "post_norm": np.ones(D, np.float32),
         "attn": {"q": w(D, H * hd), "k": w(D, KV * hd), "v": w(D, KV * hd), "o": w(H * hd, D)},
         "mlp": {"gate": w(D, F), "up": w(D, F), "down": w(F, D)}}
    return Block(config, p, jnp.float32, recipe)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="smollm2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    config = ModelConfig(vocab_size=32, num_layers=1, max_position_embeddings=a.seqlen + 8, **SHAPES[a.shape])
    preset = get_preset("w4a4kv4-static")
    recipe = preset.recipe()
    rng = np.random.default_rng(0)
    blk = random_block(config, recipe, rng)

    class _One:  # init_weight_scales walks model.layers
        layers = [blk]
    init_weight_scales(_One, preset.weight_spec(), progress=False)
    for s in ("qkv_in", "o_in", "up_gate_in", "down_in"):
        blk.set_quantizer(s, jnp.full((1, 1, 1), 0.1, jnp.float32))
    for s in ("k_cache", "v_cache"):
        blk.set_quantizer(s, jnp.full((config.num_kv_heads, 1), 0.1, jnp.float32),
                          jnp.full((config.num_kv_heads, 1), 8.0, jnp.float32))
    P = 4
    kv = lambda: [rng.standard_normal((1, P, config.num_kv_heads, config.head_dim)).astype(np.float32)]
    prefix = PrefixKV(k=kv(), v=kv(), prefix_ids=[1, 2, 3, 4], text="", k_rotated=True)
    cfg = TrainConfig(samples=a.batch, seqlen=a.seqlen, batch_size=a.batch, epochs=a.steps + 1)
    compiled = CompiledBlock(config, prefix, a.seqlen)
    trainer = BlockTrainer(compiled, blk, prefixquant_groups(cfg), cfg)
    gd, train, rest = trainer.split(blk)
    opt = trainer.tx.init(train)
    x = rng.standard_normal((a.batch, a.seqlen, config.hidden_size)).astype(np.float32)
    target = x + 0.01 * rng.standard_normal(x.shape).astype(np.float32)
    xb, ck, cv, tb = trainer.batch(0, x, target, np.arange(a.batch))
    t = time.perf_counter()
    train, opt, loss = trainer._step(gd, train, opt, rest, xb, ck, cv, compiled.cos, compiled.sin, tb)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(a.steps):
        train, opt, loss = trainer._step(gd, train, opt, rest, xb, ck, cv, compiled.cos, compiled.sin, tb)
    jax.block_until_ready(loss)
    sec = (time.perf_counter() - t) / a.steps
    res = {"shape": a.shape, "batch": a.batch, "seqlen": a.seqlen, "devices": [str(d) for d in jax.devices()],
           "first_step_s": compile_s, "step_s": sec, "steps_per_s": 1 / sec, "tokens_per_s": a.batch * a.seqlen / sec}
    print(f"{a.shape} block, batch {a.batch} x {a.seqlen} on {jax.devices()[0].platform} x{jax.device_count()}: "
          f"{1 / sec:.3f} steps/s ({res['tokens_per_s']:.0f} tokens/s), first step (compile) {compile_s:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
