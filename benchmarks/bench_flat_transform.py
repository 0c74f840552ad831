"""Cost of FlatQuant's online Kronecker transform relative to the linear layer it feeds, against a full
Hadamard transform (FWHT, `rotate/hadamard.py`) of the same size, on CPU.

Usage:
    python benchmarks/bench_flat_transform.py [--json out.json|-] [--tokens 256] [--iters 20] [--sizes 576x960,1536x576]

For each (n, out): x [tokens, n] float32; times (median ms, jitted) of
  kron      x @ (P1 kron P2) as two small matmuls on x viewed as [tokens, n1, n2] (n1 x n2 = kron_sizes(n))
  hadamard  x @ H_n by the fast Walsh-Hadamard transform (+ its small m x m factor)
  linear    x @ W, W [n, out] (the layer the transform feeds; fp32 matmul)
and the ratios kron / linear, hadamard / linear, kron / hadamard. Default sizes: SmolLM2's qkv input
(576 -> q+k+v = 960), its down_proj input (1536 -> 576) and a Llama-7B-like 4096 -> 4096.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._timing import timeit, write_json  # noqa: E402

import jax
import jax.numpy as jnp
import numpy as np

from prefixquant_jax.flatquant.transforms import kron_apply, kron_sizes
from prefixquant_jax.rotate.hadamard import hadamard_transform

DEFAULT_SIZES = "576x960,1536x576,4096x4096"




def bench(n: int, out: int, tokens: int, iters: int) -> dict:
    rng = np.random.default_rng(0)
    n1, n2 = kron_sizes(n)
    x = jnp.asarray(rng.standard_normal((tokens, n)), jnp.float32)
    p1 = jnp.asarray(rng.standard_normal((n1, n1)), jnp.float32)
    p2 = jnp.asarray(rng.standard_normal((n2, n2)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((n, out)) / np.sqrt(n), jnp.float32)
    t_kron = timeit(jax.jit(kron_apply), x, p1, p2, iters=iters, batches=5)
    t_had = timeit(jax.jit(hadamard_transform), x, iters=iters, batches=5)
    t_lin = timeit(jax.jit(jnp.matmul), x, w, iters=iters, batches=5)
    return {"n": n, "out": out, "kron": [n1, n2], "tokens": tokens, "kron_ms": t_kron, "hadamard_ms": t_had,
            "linear_ms": t_lin, "kron_over_linear": t_kron / t_lin, "hadamard_over_linear": t_had / t_lin,
            "kron_over_hadamard": t_kron / t_had,
            "flops_ratio_kron_over_linear": (n * (n1 + n2)) / (n * out)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH ('-' for stdout)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated NxOUT pairs (transform size x linear outputs)")
    args = ap.parse_args(argv)
    try:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
        assert all(len(s) == 2 and min(s) > 0 for s in sizes)
    except (ValueError, AssertionError):
        print(f"error: --sizes must look like 576x960,1536x576; got {args.sizes!r}", file=sys.stderr)
        return 2
    rows = [bench(n, out, args.tokens, args.iters) for n, out in sizes]
    print(f"device: {jax.devices()[0].device_kind}, tokens {args.tokens}, fp32, median ms")
    print(f"{'n x out':>12s} {'kron':>9s} {'kron ms':>8s} {'FWHT ms':>8s} {'linear ms':>9s} "
          f"{'kron/lin':>8s} {'FWHT/lin':>8s} {'kron/FWHT':>9s}")
    for r in rows:
        print(f"{r['n']:>6d}x{r['out']:<5d} {r['kron'][0]:>4d}x{r['kron'][1]:<4d} {r['kron_ms']:8.3f} {r['hadamard_ms']:8.3f} "
              f"{r['linear_ms']:9.3f} {r['kron_over_linear']:8.3f} {r['hadamard_over_linear']:8.3f} {r['kron_over_hadamard']:9.3f}")
    res = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "rows": rows}
    write_json(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
