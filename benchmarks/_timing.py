"""Shared helpers for the benchmark scripts: timing and --json output."""
from __future__ import annotations

import statistics
import time

import jax


def timeit(fn, *args, iters: int, warmup: int = 3, batches: int = 3) -> float:
    """Median milliseconds per call over `batches` batches of `iters` calls, after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    per_call = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(per_call)


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
