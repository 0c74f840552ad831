"""Screen fine-tuning learning rates on held-out calibration samples (never the test windows).

After GPTQ the kernels sit exactly on the 4-bit grid, so a weight learning rate sized for RTN weights
(5e-6 with Adam: at most ~1.6e-4 of movement in 32 steps, against a half step of ~7e-3) cannot flip a
single code. This script quantizes once (GPTQ, no training), then for each (lr_quant, lr_weight) trains
the first K blocks exactly as `train_blockwise` does (same 32 samples, seed 0) and reports the block-K
output MSE against the FP model on 8 held-out WikiText-2 validation samples, drawn after the training
ones from the same seeded generator.

    python benchmarks/ft_lr_screen.py --blocks 4 --lrs 5e-5:5e-6 5e-4:5e-5 5e-4:2e-4 --json results/diagnose/ft-lr.json
"""
from __future__ import annotations

import argparse
import json
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import prefixquant_jax as pq
from prefixquant_jax.compiled_block import CompiledBlock
from prefixquant_jax.eval.data import calibration_samples, load_text, tokenize
from prefixquant_jax.train.blockwise import TrainConfig, train_blockwise


def heldout_mse(fp_model, q_model, prefix_kv, x: np.ndarray, blocks: int) -> list[float]:
    """MSE of each of the first `blocks` block outputs, quantized path vs FP path, on embedded x."""
    compiled = CompiledBlock(q_model.config, prefix_kv, x.shape[1])
    x_fp, x_q, out = x, x, []
    for layer in range(blocks):
        x_fp = compiled.forward(fp_model.layers[layer], layer, x_fp, 4)
        x_q = compiled.forward(q_model.layers[layer], layer, x_q, 4)
        out.append(float(np.mean((x_q - x_fp) ** 2)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="w4a4kv4-static")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--lrs", nargs="+", default=["5e-5:5e-6", "5e-4:5e-5", "5e-4:2e-4"],
                    help="LR_QUANT:LR_WEIGHT pairs")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--heldout", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args()

    ck = pq.load_checkpoint("smollm2")
    ids = tokenize(ck.tokenizer(), load_text("wikitext2-valid"))
    calib = calibration_samples(ids, args.calib_samples, 512, 0)
    base = TrainConfig(samples=32, seqlen=512, batch_size=4, epochs=4)  # the `fast` preset
    drawn = calibration_samples(ids, base.samples + args.heldout, base.seqlen, base.seed)
    assert np.array_equal(drawn[:base.samples], calibration_samples(ids, base.samples, base.seqlen, base.seed))
    t0 = time.time()
    qm = pq.quantize(ck, calib, args.preset, gptq=True, progress=True)
    print(f"quantized in {time.time() - t0:.0f} s")
    embed = np.asarray(qm.model.embed[...], np.float32)
    x_train, x_held = embed[drawn[:base.samples]], embed[drawn[base.samples:]]
    rows = [{"lr_quant": None, "lr_weight": None,
             "heldout_mse": heldout_mse(qm.fp_model, qm.model, qm.prefix_kv, x_held, args.blocks)}]
    print("no training", rows[0]["heldout_mse"])
    for pair in args.lrs:
        lq, lw = (float(v) for v in pair.split(":"))
        # a deep copy: the trainer donates its parameter buffers, which nnx.clone would share with qm.model
        gd, state = nnx.split(qm.model)
        q = nnx.merge(gd, jax.tree.map(lambda a: jnp.array(a, copy=True), state))
        part = types.SimpleNamespace(config=q.config, layers=list(q.layers)[:args.blocks])
        cfg = TrainConfig(samples=32, seqlen=512, batch_size=4, epochs=4, lr_quant=lq, lr_weight=lw)
        t0 = time.time()
        logs = train_blockwise(qm.fp_model, part, x_train, qm.prefix_kv, cfg, progress=False)
        row = {"lr_quant": lq, "lr_weight": lw, "seconds": time.time() - t0,
               "train_ratio": [lg["loss_after"] / lg["loss_before"] for lg in logs],
               "heldout_mse": heldout_mse(qm.fp_model, q, qm.prefix_kv, x_held, args.blocks)}
        rows.append(row)
        print(pair, "train ratio", np.round(row["train_ratio"], 3), "held-out", row["heldout_mse"], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "blocks": args.blocks, "heldout_samples": args.heldout, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
