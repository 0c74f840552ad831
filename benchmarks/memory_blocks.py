"""Peak host memory of `prefixquant quantize` on random Llama-3-8B-shaped checkpoints of 2 and 6 layers.

    python benchmarks/memory_blocks.py [--layers 2 6] [--vocab 4096] [--preset w4a8kv4-static] [--dir DIR]
                                       [--keep] [--json OUT] [-- EXTRA QUANTIZE FLAGS]

Builds, for each layer count, a random checkpoint with Llama-3-8B's block shapes (hidden 4096, MLP 14336,
32 heads, 8 KV heads, head_dim 128; the vocabulary is cut to --vocab, default 4096 instead of 128256, to keep
the disk small: embeddings and head are the same in every size, so they cancel in the difference) as bf16
safetensors, one shard per layer plus one for embeddings/norm/head and a model.safetensors.index.json, and a
small BPE tokenizer. Then runs `python -m prefixquant_jax.cli.main quantize` (the `prefixquant` CLI) on it in a fresh wrapper process per
size; the wrapper reports `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`, the peak RSS of that quantize run.

The check (issue [L]): peak(6 layers) - peak(2 layers) < 4 x one block's float32 weights x 1.1, i.e. memory
grows with the block, not the model. `fp32_copies` = (difference / 4 layers) / one block's fp32 bytes: the
number of float32 copies of a block the pipeline holds per layer of the model (1.1 would pass).

Default quantize flags (what a 2-core CPU finishes in minutes): 1 calibration sample of 16 tokens, outlier
detection on it, data-free RTN weight clip (--weight-clip mse), static activation/KV calibration with one grid
sample, no evaluation.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128)
QUANTIZE_FLAGS = ["--calib-samples", "1", "--calib-seqlen", "16", "--outlier-samples", "1", "--grid-samples", "1",
                  "--weight-clip", "mse", "--no-eval"]
TEXT = ("The quick brown fox jumps over the lazy dog. A small model reads a small text about memory.\n") * 50

# the wrapper: one quantize run as its only child, then the child's peak RSS (ru_maxrss is in KiB on Linux);
# the child is killed when its RSS passes argv[1] GiB or the machine has < 0.5 GiB left (a shared machine:
# never push it into the OOM killer)
_WRAPPER = """
import json, resource, subprocess, sys, time
limit, t, killed, rss = float(sys.argv[1]) * 2**30, time.time(), False, 0
p = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
import threading
out = []
threading.Thread(target=lambda: out.append(p.stdout.read()), daemon=True).start()
while p.poll() is None:
    try:
        with open(f"/proc/{p.pid}/status") as f:
            rss = max(rss, next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) * 1024)
    except (OSError, StopIteration):
        pass
    with open("/proc/meminfo") as f:  # others may fill the machine meanwhile: stop before the OOM killer does
        avail = next(int(l.split()[1]) for l in f if l.startswith("MemAvailable")) * 1024
    if rss > limit or avail < 2**29:
        killed = True
        p.kill()
    time.sleep(0.1)
p.wait()
time.sleep(0.2)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": p.returncode, "peak_rss_kib": ru.ru_maxrss, "wall_s": time.time() - t, "killed": killed,
                  "limit_bytes": limit, "output": "".join(out)[-3000:]}))
"""


# --stages: the CLI's steps one by one in one process, printing the RSS after each (which stage holds what)
_STAGES = """
import json, resource, sys
import numpy as np
def mark(name, out={}):
    with open("/proc/self/status") as f:
        rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) * 1024
    out[name] = {"rss": rss, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    print("STAGES " + json.dumps(out), flush=True)
mark("start")
import prefixquant_jax as pq
mark("imports")
ck = pq.load_checkpoint(sys.argv[1])
mark("load_checkpoint (embeddings and head; layers read when asked for)")
calib = np.random.default_rng(0).integers(3, 300, size=(1, 16)).astype(np.int32)
qm = pq.quantize(ck, calib, sys.argv[2], weight_clip="mse", outlier_samples=1, grid_samples=1)
mark("pq.quantize (outliers, prefix KV, rotate, weights, calibration)")
"""


def block_params(c: dict) -> int:
    """Parameters of one decoder block (7 linears + 2 norms)."""
    D, F, q, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"] * c["head_dim"], \
        c["num_key_value_heads"] * c["head_dim"]
    return D * q + 2 * D * kv + q * D + 3 * D * F + 2 * D


def hf_config(layers: int, vocab: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
            "num_hidden_layers": layers, **SHAPE, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": "bfloat16"}


def tokenizer():
    from checkpoints_convert.bpe import bpe_tokenizer
    return bpe_tokenizer(TEXT, vocab_size=320)


def build_checkpoint(path: str, layers: int, vocab: int, seed: int = 0) -> int:
    """Write the random bf16 checkpoint (one shard per layer); returns its bytes on disk."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    c = hf_config(layers, vocab)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    rng = np.random.default_rng(seed)
    D, F, H, KV, hd = (SHAPE[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                          "num_key_value_heads", "head_dim"))

    def rand(*shape, scale=0.02):
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * scale).to(torch.bfloat16)

    def ones(n):
        return torch.from_numpy(1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).to(torch.bfloat16)

    shards, weight_map = layers + 1, {}
    name = lambda i: f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    outer = {"model.embed_tokens.weight": rand(vocab, D), "model.norm.weight": ones(D), "lm_head.weight": rand(vocab, D)}
    save_file(outer, os.path.join(path, name(0)), metadata={"format": "pt"})
    weight_map.update({k: name(0) for k in outer})
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "self_attn.q_proj.weight": rand(H * hd, D), p + "self_attn.k_proj.weight": rand(KV * hd, D),
             p + "self_attn.v_proj.weight": rand(KV * hd, D), p + "self_attn.o_proj.weight": rand(D, H * hd),
             p + "mlp.gate_proj.weight": rand(F, D), p + "mlp.up_proj.weight": rand(F, D),
             p + "mlp.down_proj.weight": rand(D, F), p + "input_layernorm.weight": ones(D),
             p + "post_attention_layernorm.weight": ones(D)}
        save_file(t, os.path.join(path, name(i + 1)), metadata={"format": "pt"})
        weight_map.update({k: name(i + 1) for k in t})
        del t
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    tokenizer().save_pretrained(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("MemAvailable")) * 1024


def measure(path: str, preset: str, extra: list[str], limit_gib: float, stages: bool = False) -> dict:
    """Peak RSS of one `quantize` run, from a fresh wrapper process (its only child is that run), killed above
    `limit_gib`; stages: the --stages child instead, its RSS after each step under "stages"."""
    cmd = [sys.executable, "-m", "prefixquant_jax.cli.main", "quantize", "--model", path, "--preset", preset,
           *QUANTIZE_FLAGS, *extra]
    if stages:
        cmd = [sys.executable, "-c", _STAGES, path, preset]
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-c", _WRAPPER, str(limit_gib), *cmd], capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"error: wrapper failed: {r.stderr[-2000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["command"] = " ".join(cmd[1:]) if not stages else f"--stages child on {path} {preset}"
    marks = [line for line in res["output"].splitlines() if line.startswith("STAGES ")]
    if marks:
        res["stages"] = json.loads(marks[-1][len("STAGES "):])
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs=2, default=(2, 6), metavar=("SMALL", "LARGE"))
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--preset", default="w4a8kv4-static")
    ap.add_argument("--dir", help="build the checkpoints here (default: a temp dir, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--json", dest="json_out", metavar="OUT")
    ap.add_argument("--max-rss-gib", type=float, help="kill a quantize run whose RSS passes this (default: 85 %% of "
                    "the memory available when it starts); the result is then a lower bound")
    ap.add_argument("--stages", action="store_true", help="instead of the CLI, its steps one by one in one process "
                    "(pq.load_checkpoint, pq.quantize with RTN weights), the RSS after each")
    ap.add_argument("extra", nargs="*", help="more quantize flags (after --)")
    args = ap.parse_args(argv)
    small, large = args.layers
    if not 1 <= small < large:
        print(f"error: --layers needs 1 <= SMALL < LARGE, got {small} {large}", file=sys.stderr)
        return 2
    base = args.dir or tempfile.mkdtemp(prefix="memory-blocks-")
    c = hf_config(1, args.vocab)
    block_fp32 = 4 * block_params(c)
    out = {"date": time.strftime("%Y-%m-%d"), "shape": SHAPE, "vocab": args.vocab, "preset": args.preset,
           "quantize_flags": QUANTIZE_FLAGS + list(args.extra), "block_fp32_bytes": block_fp32, "runs": {}}
    try:
        for n in (small, large):
            path = os.path.join(base, f"llama3-8b-shaped-{n}L")
            t = time.time()
            disk = build_checkpoint(path, n, args.vocab)
            print(f"{n} layers: checkpoint {disk / 2**30:.2f} GiB bf16 built in {time.time() - t:.0f} s", flush=True)
            limit = args.max_rss_gib or 0.85 * available_bytes() / 2**30
            r = measure(path, args.preset, list(args.extra), limit, args.stages)
            if r["rc"] and not r["killed"]:
                print(f"error: quantize on {n} layers exited {r['rc']}: {r['output'][-1500:]}", file=sys.stderr)
                return 1
            r.update(checkpoint_bytes=disk, peak_rss_bytes=r["peak_rss_kib"] * 1024)
            out["runs"][n] = {k: v for k, v in r.items() if k != "output"}
            print(f"{n} layers: peak RSS {'> ' if r['killed'] else ''}{r['peak_rss_bytes'] / 2**30:.2f} GiB in "
                  f"{r['wall_s']:.0f} s{' (killed at the RSS limit)' if r['killed'] else ''}", flush=True)
            for name, m in r.get("stages", {}).items():
                print(f"    after {name}: RSS {m['rss'] / 2**30:.2f} GiB, peak {m['peak'] / 2**30:.2f} GiB", flush=True)
            if not args.keep:
                shutil.rmtree(path)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    diff = out["runs"][large]["peak_rss_bytes"] - out["runs"][small]["peak_rss_bytes"]
    limit = (large - small) * block_fp32 * 1.1
    killed = out["runs"][large]["killed"]  # then the difference is a lower bound
    out.update(difference_bytes=diff, difference_is_lower_bound=killed, limit_bytes=limit,
               passed=bool(diff < limit and not killed), fp32_copies=diff / (large - small) / block_fp32)
    print(f"difference {'> ' if killed else ''}{diff / 2**30:.2f} GiB vs limit {limit / 2**30:.2f} GiB ({large - small} x one block's fp32 "
          f"weights {block_fp32 / 2**30:.3f} GiB x 1.1): {'PASS' if out['passed'] else 'FAIL'}; "
          f"{'> ' if killed else ''}{out['fp32_copies']:.2f} fp32 copies of each extra block held")
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
