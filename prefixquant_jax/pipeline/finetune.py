"""Fine-tune a QuantizedModel block by block on token arrays: the run's fingerprint, its resumable directory
(TrainCheckpoint), the block-wise trainer."""
from __future__ import annotations

import dataclasses
import hashlib
import time

import jax.numpy as jnp
import numpy as np

from prefixquant_jax.errors import UserError
from prefixquant_jax.options import TrainCheckpoint, TrainConfig
from prefixquant_jax.pipeline.train import prefixquant_groups, train_blockwise
from prefixquant_jax.pipeline.train_dir import TrainDir
from prefixquant_jax.quant.serial import encode


def qparams_tree(model) -> dict:
    """Every block's quantizer parameters as {"<layer>": {"<where>": {"scale": array, "zero": array}}}."""
    return {str(i): {w: {f: np.asarray(v[...]) for f, v in q.items()} for w, q in blk.qparams.items()}
            for i, blk in enumerate(model.layers)}


def set_qparams(model, tree: dict) -> None:
    """Inverse of qparams_tree."""
    for i, blk in enumerate(model.layers):
        for where, q in tree[str(i)].items():
            f32 = {f: jnp.asarray(a, jnp.float32) for f, a in q.items()}
            blk.set_quantizer(where, f32["scale"], f32.get("zero"))


def tokens_digest(tokens: np.ndarray) -> str:
    """Names token arrays in a run fingerprint: shape and sha256 of the int32 values."""
    a = np.ascontiguousarray(tokens, np.int32)
    return f"tokens{list(a.shape)}:sha256:{hashlib.sha256(a.tobytes()).hexdigest()[:16]}"


def train_tokens(tokens, cfg: TrainConfig) -> np.ndarray:
    """Training tokens as int32 [cfg.samples, cfg.seqlen]; UserError for another shape or type."""
    a = np.asarray(tokens)
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
        raise UserError(f"training tokens must be an integer array [samples, seqlen], got {a.dtype}{list(a.shape)}")
    if a.shape != (cfg.samples, cfg.seqlen):
        raise UserError(f"training tokens are {list(a.shape)} but TrainConfig.samples, TrainConfig.seqlen are "
                        f"{cfg.samples}, {cfg.seqlen}", "TrainConfig.samples", "TrainConfig.seqlen")
    return a.astype(np.int32)


def train_quantized(qm, tokens, cfg: TrainConfig, *, groups=None, checkpoint: TrainCheckpoint | None = None,
                    fingerprint: dict | None = None, progress: bool = True, mesh=None) -> dict:
    """Fine-tune `qm.model` (a QuantizedModel from `quantize`) in place against `qm.fp_blocks` on `tokens`
    (int [cfg.samples, cfg.seqlen]).

    With `checkpoint`, the post-calibration quant params, each finished block and (every cfg.ckpt_every steps) the
    running block are saved in checkpoint.dir; checkpoint.resume continues that run (when the directory holds the
    post-calibration state, calibration may be skipped before this call: it is restored here). The run's
    fingerprint: the recipe, the prefix ids, cfg, `fingerprint` (the method's options) and checkpoint.identity (its
    "calib_data" by default: a digest of the tokens). `groups`: the trainer's parameter groups (default:
    prefixquant_groups(cfg)). `mesh`: a (data, model) jax.sharding.Mesh to train on (train_blockwise). Returns
    {"config", "groups": [{"group", "lr"}] as trained, "blocks": per-block logs, "seconds"}.
    """
    t0 = time.time()
    tokens = train_tokens(tokens, cfg)
    groups = groups or prefixquant_groups(cfg)
    x0 = np.asarray(qm.model.embed[...][jnp.asarray(tokens)], np.float32)
    td = None
    if checkpoint is not None:
        identity = {"calib_data": tokens_digest(tokens), **(checkpoint.identity or {})}
        fp = {"recipe": encode(qm.recipe), "prefix_ids": list(qm.model.prefix_meta[0]) if qm.model.prefix_meta else [],
              "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "ckpt_every"},
              **(fingerprint or {}), **identity}
        td = TrainDir(checkpoint.dir, fp, resume=checkpoint.resume, overwrite=checkpoint.overwrite)
        if checkpoint.resume and td.has("init"):
            set_qparams(qm.model, td.load_init())
        else:
            td.save_init(qparams_tree(qm.model))
    try:
        logs = train_blockwise(qm.fp_blocks, qm.model, x0, cfg, groups, td, progress, mesh=mesh)
    finally:
        if td is not None:
            td.close()
    # what was trained, at which lr: with explicit groups (FlatQuant) cfg.lr_* / train_weights do not apply
    trained = [{"group": g.name, "lr": g.lr} for g in groups]
    return {"config": dataclasses.asdict(cfg), "groups": trained, "blocks": logs, "seconds": time.time() - t0}
