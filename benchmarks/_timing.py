"""Shared timing helper for the benchmark scripts."""
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
