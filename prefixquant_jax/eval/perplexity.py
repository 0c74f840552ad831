"""Perplexity over non-overlapping windows, optionally behind an FP prefix KV cache."""
from __future__ import annotations

import math
import time

import numpy as np
from tqdm.auto import tqdm

from prefixquant_jax.errors import UserError
from prefixquant_jax.compiled import Compiled
from prefixquant_jax.kv_cache import prefix_len


def perplexity(compiled: Compiled, windows: np.ndarray, prefix_kv=None, batch_size: int = 1,
               progress: bool = True, desc: str = "ppl", log_path: str | None = None, log_tag: str = "") -> dict:
    """ppl = exp(sum NLL / (n_windows * (L - 1))): each window of L tokens predicts its tokens 1..L-1.

    `prefix_kv`: default the one `compiled` runs behind (Compiled(model, prefix_kv)). With a prefix (P rows), every window sits at positions P..P+L-1 behind the prefix; prefix
    tokens are never scored. One compilation per batch shape. With `log_path`, every batch's NLL
    sum is appended there (eval/window_log.py) and batches already in it are not recomputed;
    `log_tag` names a way of computing that the state does not show (e.g. "fake-matmul=int"), so
    such a log is never mixed with the default one.
    """
    config = compiled.model.config
    n, L = windows.shape
    prefix_kv = getattr(compiled, "prefix_kv", None) if prefix_kv is None else prefix_kv
    P = prefix_len(prefix_kv)
    if P + L > config.max_position_embeddings:
        raise UserError(f"seqlen {L} (+ prefix {P}) exceeds the model's max positions {config.max_position_embeddings}")
    log = fingerprint = None
    if log_path is not None:
        from prefixquant_jax.eval.window_log import WindowLog, eval_fingerprint
        fingerprint = eval_fingerprint(compiled.state, L, prefix_kv, batch_size, log_tag)
        log = WindowLog(log_path, fingerprint)
    total, t0, reused = 0.0, time.time(), 0
    bar = tqdm(total=n, desc=desc, unit="win", disable=not progress, leave=False)
    for s in range(0, n, batch_size):
        batch = windows[s:s + batch_size]
        logged = None if log is None else log.get(s, batch)
        if logged is not None:
            nll_part = logged
            reused += len(batch)
        elif len(batch) < batch_size:  # keep one compiled shape: pad with copies, score only real rows
            nll_part = 0.0
            for row in batch:
                nll_part += float(compiled.nll(compiled.state, row[None], compiled.cache(1, P + L, prefix_kv), P))
        else:
            nll_part = float(compiled.nll(compiled.state, batch, compiled.cache(len(batch), P + L, prefix_kv), P))
        if not math.isfinite(nll_part):
            raise UserError(f"non-finite loss in windows {s}..{s + len(batch) - 1} (NaN/inf in the model's outputs)")
        if log is not None and logged is None:
            log.add(s, batch, nll_part)
        total += nll_part
        bar.update(len(batch))
        bar.set_postfix(ppl=f"{math.exp(total / ((s + len(batch)) * (L - 1))):.3f}")
    bar.close()
    nll = total / (n * (L - 1))
    return {"ppl": math.exp(nll), "nll": nll, "windows": n, "seqlen": L, "tokens": int(n * L),
            "prefix_len": P, "seconds": time.time() - t0, "windows_from_log": reused,
            **({"log_fingerprint": fingerprint} if fingerprint else {})}
