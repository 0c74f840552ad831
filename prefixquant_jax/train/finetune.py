"""Fine-tune a QuantizedModel block by block on token arrays: the run's fingerprint, its resumable directory
(TrainCheckpoint), the block-wise trainer. `finetune` is the same on text (it draws the tokens itself)."""
from __future__ import annotations

import dataclasses
import hashlib
import time

import jax.numpy as jnp
import numpy as np

from prefixquant_jax.errors import UserError
from prefixquant_jax.eval.data import calibration_samples, load_text, tokenize
from prefixquant_jax.model import legacy_qparams_key
from prefixquant_jax.options import TrainCheckpoint
from prefixquant_jax.train.blockwise import TrainConfig, prefixquant_groups, train_blockwise
from prefixquant_jax.train.state_io import TrainDir

# keys of a stored run fingerprint that were renamed: {old: new} (train.json files written before keep resuming)
FINGERPRINT_ALIASES = {"prefix_tokens": "prefix_ids"}


def qparams_tree(model) -> dict:
    """Every block's quantizer parameters as {"<layer>": {"<where>": {"scale": array, "zero": array}}}."""
    return {str(i): {w: {f: np.asarray(v[...]) for f, v in q.items()} for w, q in blk.qparams.items()}
            for i, blk in enumerate(model.layers)}


def set_qparams(model, tree: dict) -> None:
    """Inverse of qparams_tree; also reads the flat {"<layer>": {"<key>": array}} of older training directories
    (model.legacy_qparams_key)."""
    for i, blk in enumerate(model.layers):
        layer = {}
        for k, a in tree[str(i)].items():
            if isinstance(a, dict):
                layer.setdefault(k, {}).update(a)
            else:
                where, field = legacy_qparams_key(k)
                layer.setdefault(where, {})[field] = a
        for where, q in layer.items():
            f32 = {f: jnp.asarray(a, jnp.float32) for f, a in q.items()}
            blk.set_quantizer(where, f32["scale"], f32.get("zero"))


def preset_fingerprint(preset: dict) -> dict:
    """The preset fields that decide the run: not the description, and not a field at its default
    (so a field added to Preset later does not orphan older training directories)."""
    from prefixquant_jax.quant.presets import Preset

    defaults = {f.name: f.default for f in dataclasses.fields(Preset) if f.default is not dataclasses.MISSING}
    # train.json holds lists: tuples (act_site_clips, a custom recipe's sites) compare as the lists they are stored as
    as_json = lambda v: ([as_json(x) for x in v] if isinstance(v, (list, tuple))
                         else {k: as_json(x) for k, x in v.items()} if isinstance(v, dict) else v)
    return {k: as_json(v) for k, v in preset.items()
            if k != "description" and (k not in defaults or as_json(v) != as_json(defaults[k]))}


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
    """Fine-tune `qm.model` (a QuantizedModel from `quantize`) in place against `qm.fp_model` on `tokens`
    (int [cfg.samples, cfg.seqlen]).

    With `checkpoint`, the post-calibration quant params, each finished block and (every cfg.ckpt_every
    steps) the running block are saved in checkpoint.dir; checkpoint.resume continues that run (when the
    directory holds the post-calibration state, calibration may be skipped before this call: it is restored
    here). The run's fingerprint: preset, prefix ids, cfg, `fingerprint` (the method's options) and
    checkpoint.identity (its "calib_data" by default: a digest of the tokens). `groups`: the trainer's parameter groups (default:
    prefixquant_groups(cfg)). `mesh`: a (data, model) jax.sharding.Mesh to train on (train_blockwise). Returns {"config", "groups": [{"group", "lr"}] as trained, "blocks": per-block
    logs, "seconds"}.
    """
    t0 = time.time()
    tokens = train_tokens(tokens, cfg)
    groups = groups or prefixquant_groups(cfg)
    x0 = np.asarray(qm.model.embed[...][jnp.asarray(tokens)], np.float32)
    td = None
    if checkpoint is not None:
        identity = {"calib_data": tokens_digest(tokens), **(checkpoint.identity or {})}
        prefix_ids = [] if qm.prefix_kv is None else [int(t) for t in qm.prefix_kv.prefix_ids]
        fp = {"preset": preset_fingerprint(dataclasses.asdict(qm.preset)), "prefix_ids": prefix_ids,
              "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "ckpt_every"},
              **(fingerprint or {}), **identity}
        td = TrainDir(checkpoint.dir, fp, resume=checkpoint.resume, overwrite=checkpoint.overwrite,
                      normalize={"preset": preset_fingerprint}, aliases=FINGERPRINT_ALIASES)
        if checkpoint.resume and td.has("init"):
            set_qparams(qm.model, td.load_init())
        else:
            td.save_init(qparams_tree(qm.model))
    try:
        fp = qm.fp_blocks() if hasattr(qm, "fp_blocks") else qm.fp_model  # one FP block at a time, not the model
        logs = train_blockwise(fp, qm.model, x0, qm.prefix_kv, cfg, groups, td, progress, mesh=mesh)
    finally:
        if td is not None:
            td.close()
    # what was trained, at which lr: with explicit groups (FlatQuant) cfg.lr_* / train_weights do not apply
    trained = [{"group": g.name, "lr": g.lr} for g in groups]
    return {"config": dataclasses.asdict(cfg), "groups": trained, "blocks": logs, "seconds": time.time() - t0}


def finetune(qm, tokenizer, cfg: TrainConfig, *, calib_data: str = "wikitext2-valid", train_dir: str | None = None,
             resume: bool = False, overwrite: bool = False, groups=None, progress: bool = True,
             fingerprint: dict | None = None) -> dict:
    """`train_quantized` on text: cfg.samples windows of cfg.seqlen tokens of `calib_data` (drawn with cfg.seed,
    as the CLI draws them), checkpointed in `train_dir` when given (the run named by calib_data and
    `fingerprint`)."""
    tokens = calibration_samples(tokenize(tokenizer, load_text(calib_data)), cfg.samples, cfg.seqlen, cfg.seed)
    checkpoint = None if train_dir is None else TrainCheckpoint(
        dir=train_dir, resume=resume, overwrite=overwrite, identity={"calib_data": calib_data, **(fingerprint or {})})
    return train_quantized(qm, tokens, cfg, groups=groups, checkpoint=checkpoint, progress=progress)
