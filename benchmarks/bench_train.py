"""Block-wise training speed: seconds per train step of one decoder block of the bundled SmolLM2, ours and (with
--peer) the FlatQuant authors' code, on the same block, the same tokens and the same number of threads, one after
the other.

    python benchmarks/bench_train.py [--method flatquant|prefixquant] [--threads 1] [--steps 16] [--peer] [--json OUT]
    python benchmarks/bench_train.py --model DIR --allow-tiny      # a tiny model: checks that the script runs

Ours: block 0 (its inputs are the embeddings, on the FP path and the quantized one alike), the `fast` training
tokens (32 x 512 samples of the validation split, seed 0: what `quantize` draws), batch 4; FlatQuant's
(`flatquant-w4a4kv4`: transforms initialised from the FP block's channel maxima, LWC/LAC, lr 5e-3) or PrefixQuant's
fine-tuning (`w4a4kv4-static` with RTN weights and full-range static scales: quantizer scales and weights). Each
step as the trainer runs it (pipeline/train.py: the batch put on the device, the jitted step, the loss read back);
the first step (the compile) is reported apart and the median of the others is the step time. --threads N: XLA's
CPU thread pool limited to N (XLA_FLAGS, set before jax loads) and the process pinned to N cores.

--peer (flatquant only): the authors' code through ../shared/peers/flatquant/rows.sh fq-fast (one torch thread,
fp32; PEER=DIR, default /tmp/peer-fq, set up as that directory's README says), stopped once its block 0 has run its
epochs; its log gives each epoch's seconds (8 steps of batch 4 on the same 32 x 512 tokens), and the median of the
epochs after the first, divided by 8, is its step time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PEER_ROWS = os.path.join(HERE, "..", "..", "shared", "peers", "flatquant", "rows.sh")


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("flatquant", "prefixquant"), default="flatquant")
    ap.add_argument("--model", default="smollm2", help="a checkpoint, or a built-in shape (llama-3-8b, ...): one random "
                    "block and random tokens (no checkpoint needed: the GPU session)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (0: leave XLA and the affinity alone, e.g. a GPU)")
    ap.add_argument("--steps", type=int, default=16, help="timed steps after the first")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--peer", action="store_true", help="also time the FlatQuant authors' code (module docstring)")
    ap.add_argument("--rounds", type=int, default=1, help="with --peer: ours then theirs, this many times (the machine's "
                    "speed drifts: each round's ratio is measured side by side, the median ratio reported)")
    ap.add_argument("--allow-tiny", action="store_true", help="a tiny --model: short samples from its own vocabulary")
    ap.add_argument("--json")
    return ap.parse_args(argv)


def ours(a) -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    import prefixquant_jax as pq
    from prefixquant_jax.eval.data import calibration_samples, load_text, tokenize
    from prefixquant_jax.nn.decoder import Block, Decoder
    from prefixquant_jax.pipeline.blocks import BlockRunner
    from prefixquant_jax.pipeline.calibrate import _site_range, init_qparams, static_sites
    from prefixquant_jax.pipeline.flatquant import channel_absmax, flatquant_groups
    from prefixquant_jax.pipeline.stages import init_weight_scales
    from prefixquant_jax.pipeline.train import BlockTrainer, prefixquant_groups, train_query_chunk
    from prefixquant_jax.flatquant.transforms import init_block

    from prefixquant_jax.parallel.plan import BUILTIN, abstract_params, resolve_config

    if a.model in BUILTIN:  # a built-in shape (the GPU session: llama-3-8b): one random block, random tokens
        config = dataclasses.replace(resolve_config(a.model)[0], num_layers=1, vocab_size=1024)  # the block is timed
        rng = np.random.default_rng(0)
        one = jax.tree_util.tree_map_with_path(
            lambda path, s: np.ones(s.shape, np.float32) if "norm" in jax.tree_util.keystr(path)
            else (0.02 * rng.standard_normal(s.shape)).astype(np.float32), abstract_params(config))
        tokens = rng.integers(3, config.vocab_size, (a.samples, a.seqlen)).astype(np.int32)
    else:
        ck = pq.load_checkpoint(a.model)
        config = ck.config
        if a.allow_tiny:
            tokens = np.random.default_rng(0).integers(3, config.vocab_size, (a.samples, a.seqlen)).astype(np.int32)
        else:
            tokens = calibration_samples(tokenize(ck.tokenizer(), load_text("wikitext2-valid")), a.samples, a.seqlen, 0)
        one = dict(ck.params, layers={0: ck.params["layers"][0]})
    c1 = dataclasses.replace(config, num_layers=1)
    recipe = pq.preset("flatquant-w4a4kv4" if a.method == "flatquant" else "w4a4kv4-static").replace(prefix=False)
    fp = Decoder(c1, one)
    x = np.asarray(fp.embed[...][jnp.asarray(tokens)], np.float32)
    runner = BlockRunner(c1, 0, a.seqlen)
    target = runner.forward(fp.layers[0], x, 8)
    q = Decoder(c1, one, recipe=recipe)
    blk = q.layers[0]
    cfg = pq.TrainConfig(samples=a.samples, seqlen=a.seqlen, batch_size=a.batch, epochs=max(1, (a.steps + 1) * a.batch
                                                                                          // a.samples + 1))
    if a.method == "flatquant":
        stats = channel_absmax(fp, tokens, progress=False)
        init_block(blk, c1, (0, 0), "inverse", stats[0], 0.3, lwc=True, lac_sites=[s for s, _ in recipe.sites])
        groups = flatquant_groups(5e-3)
    else:
        init_weight_scales(q, recipe.weight, progress=False)
        ranges = runner.ranges(blk, x, 8)
        init_qparams(blk, recipe, {s: _site_range(*ranges[s], recipe.spec(s)) for s in static_sites(recipe)})
        groups = prefixquant_groups(cfg)
    trainer = BlockTrainer(runner, groups, cfg)
    blk.query_chunk = train_query_chunk(x.shape[1])  # as train_blockwise sets it
    gd, train, rest = trainer.split(blk)
    opt = trainer.init_opt(train)
    times = []
    xd, td = trainer.resident(x, target)
    for s in range(a.steps + 1):
        epoch, i = divmod(s, cfg.steps_per_epoch)
        idx = np.sort(trainer.order(0, epoch)[i * cfg.batch_size:(i + 1) * cfg.batch_size])
        t = time.perf_counter()
        train, opt, loss = trainer.step_on(gd, train, opt, rest, xd, td, idx)
        float(loss)
        times.append(time.perf_counter() - t)
    return {"first_step_s": times[0], "step_s": statistics.median(times[1:]), "steps": a.steps,
            "devices": [str(d) for d in jax.devices()], "jax": jax.__version__, "loss": float(loss)}


def peer(a) -> dict:
    """The authors' code (module docstring): its block 0's epoch times, then the run is stopped."""
    env = dict(os.environ, NWIN="1")
    env.setdefault("PEER", "/tmp/peer-fq")
    cmd = ["taskset", "-c", "0", "bash", PEER_ROWS, "fq-fast"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    epochs, lines = [], []
    pat = re.compile(r"layer 0 lwc lac iter (\d+), lr [\d.e-]+\s+time ([\d.]+)s")
    try:
        for line in proc.stdout:
            lines.append(line)
            m = pat.search(line)
            if m:
                epochs.append(float(m.group(2)))
            if re.search(r"layer 1 lwc lac iter 0|========= Layer 1", line) or len(epochs) >= 4:
                break
    finally:
        proc.kill()
        proc.wait()
    if len(epochs) < 2:
        raise SystemExit("error: the peer run gave no block-0 epoch times; its output ended with:\n" + "".join(lines[-15:]))
    steps_per_epoch = a.samples // a.batch
    return {"epoch_s": epochs, "step_s": statistics.median(epochs[1:]) / steps_per_epoch,
            "command": " ".join(cmd), "threads": 1}


def main(argv=None) -> int:
    a = _args(argv)
    if a.peer and a.method != "flatquant":
        raise SystemExit("error: --peer times the FlatQuant authors' code: --method flatquant")
    if a.threads:  # before jax loads: XLA's CPU pool and the cores this process may use
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   f"intra_op_parallelism_threads={a.threads}").strip()
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(range(a.threads)))
    res = {"method": a.method, "model": a.model, "threads": a.threads, "batch": a.batch, "seqlen": a.seqlen,
           "samples": a.samples, "date": time.strftime("%Y-%m-%d"), "rounds": []}
    for r in range(a.rounds if a.peer else 1):
        rnd = {"ours": ours(a)}
        print(f"ours  ({a.method}, block 0, batch {a.batch} x {a.seqlen}, {a.threads} thread(s)): "
              f"{rnd['ours']['step_s']:.3f} s/step (first step, with the compile: {rnd['ours']['first_step_s']:.1f} s)",
              flush=True)
        if a.peer:
            rnd["peer"] = peer(a)
            rnd["ratio_peer_over_ours"] = rnd["peer"]["step_s"] / rnd["ours"]["step_s"]
            print(f"peer  (FlatQuant authors' code, block 0, 1 torch thread): {rnd['peer']['step_s']:.3f} s/step "
                  f"(epochs {', '.join(f'{e:.1f}' for e in rnd['peer']['epoch_s'])} s); "
                  f"peer / ours {rnd['ratio_peer_over_ours']:.2f}", flush=True)
        res["rounds"].append(rnd)
    res["ours"] = {"step_s": statistics.median(r["ours"]["step_s"] for r in res["rounds"])}
    if a.peer:
        res["peer"] = {"step_s": statistics.median(r["peer"]["step_s"] for r in res["rounds"])}
        res["ratio_peer_over_ours"] = statistics.median(r["ratio_peer_over_ours"] for r in res["rounds"])
        print(f"peer / ours, median over {a.rounds} round(s): {res['ratio_peer_over_ours']:.2f} (> 1: ours is faster)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
