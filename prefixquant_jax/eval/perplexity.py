"""Perplexity over non-overlapping windows, behind the model's FP prefix."""
from __future__ import annotations

import math
import time

import numpy as np
from tqdm.auto import tqdm

from flax import nnx

from prefixquant_jax.errors import UserError
from prefixquant_jax.eval import forward
from prefixquant_jax.eval.window_log import WindowLog, eval_fingerprint
from prefixquant_jax.parallel.sharding import place_batch


def perplexity(model, windows: np.ndarray, batch_size: int = 1, progress: bool = True, desc: str = "ppl",
               log_path: str | None = None, log_tag: str = "", mesh=None) -> dict:
    """ppl = exp(sum NLL / (n_windows * (L - 1))): each window of L tokens predicts its tokens 1..L-1.

    `model`: any Decoder (FP, fake-quant, packed integer); every window sits at positions P..P+L-1 behind its
    FP prefix (P = 0 without one), whose tokens are never scored. One compilation per batch shape. With
    `log_path`, every batch's NLL sum is appended there (eval/window_log.py) and batches already in it are not
    recomputed; `log_tag` names a way of computing that the state does not show (e.g. "mesh-model=2"), so such a
    log is never mixed with the default one. `mesh`: the mesh the model's state was put on
    (parallel.sharding.shard); the batches' rows go over its `data` axis.
    """
    config = model.config
    n, L = windows.shape
    P = model.prefix_len
    if P + L > config.max_position_embeddings:
        raise UserError(f"seqlen {L} (+ prefix {P}) exceeds the model's max positions {config.max_position_embeddings}")
    graphdef, state = nnx.split(model)
    log = fingerprint = None
    if log_path is not None:
        fingerprint = eval_fingerprint(graphdef, state, L, batch_size, log_tag)
        log = WindowLog(log_path, fingerprint)

    def batch_nll(rows):
        return float(forward.nll(graphdef, state, place_batch(mesh, rows), place_batch(mesh, model.init_cache(len(rows), L))))

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
                nll_part += batch_nll(row[None])
        else:
            nll_part = batch_nll(batch)
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
