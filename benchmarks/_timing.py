"""Shared helpers for the benchmark scripts: timing and --json output."""
from __future__ import annotations

import statistics
import time

import jax


def timeit(fn, *args, iters: int, warmup: int = 3, batches: int = 3) -> float:
    """Median milliseconds per call over `batches` batches of `iters` calls, after `warmup` calls."""
    return timeit_cycle(fn, [args], iters=iters, warmup=warmup, batches=batches)


def timeit_cycle(fn, arg_sets, *, iters: int, warmup: int = 3, batches: int = 3) -> float:
    """timeit, with call i taking arg_sets[i % len(arg_sets)]: for memory-bound kernels whose inputs would
    otherwise stay in the L2 cache between calls (50 MB on an H100 / H200), see copies_beyond_l2."""
    for i in range(warmup):
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    per_call = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for i in range(iters):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(per_call)


def copies_beyond_l2(nbytes: int, working_set: int = 128 << 20, most: int = 16) -> int:
    """How many distinct copies of an nbytes input make a working set of >= working_set bytes (2.5x the L2)."""
    return max(1, min(most, -(-working_set // max(nbytes, 1))))


def write_json(doc: dict, path: str | None) -> None:
    """`--json` output: nothing for None, stdout for "-", else the file."""
    import json

    if not path:
        return
    if path == "-":
        print(json.dumps(doc, indent=1))
    else:
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)


def add_common_args(ap, *, iters: int, warmup: int) -> None:
    """--json, --iters, --warmup and --allow-cpu, shared by the GPU benchmark scripts."""
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH ('-' for stdout)")
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--allow-cpu", action="store_true", help="tiny shapes in interpret mode on CPU (script check)")


def on_gpu_or_allowed(script: str, allow_cpu: bool) -> bool | None:
    """True on a GPU; False off a GPU with --allow-cpu (run the tiny check); None: print why and stop."""
    backend = jax.default_backend()
    if backend == "gpu":
        return True
    if not allow_cpu:
        print(f"{script}: needs a GPU (JAX backend is {backend!r}); use --allow-cpu for a tiny interpret-mode check.")
        return None
    return False
