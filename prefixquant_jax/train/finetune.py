"""`finetune(quantized_model, ...)`: training samples, the resumable run directory, the block-wise trainer."""
from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np

from prefixquant_jax.eval.data import calibration_samples, load_text, tokenize
from prefixquant_jax.model import QuantParam
from prefixquant_jax.train.blockwise import TrainConfig, prefixquant_groups, train_blockwise
from prefixquant_jax.train.state_io import TrainDir


def qparams_tree(model) -> dict:
    """Every block's quant params as {"<layer>": {"<key>": array}}."""
    return {str(i): {k: np.asarray(v[...]) for k, v in blk.qparams.items()} for i, blk in enumerate(model.layers)}


def set_qparams(model, tree: dict) -> None:
    for i, blk in enumerate(model.layers):
        for k, a in tree[str(i)].items():
            blk.qparams[k] = QuantParam(jnp.asarray(a, jnp.float32))


def preset_fingerprint(preset: dict) -> dict:
    """The preset fields that decide the run: not the description, and not a field at its default
    (so a field added to Preset later does not orphan older training directories)."""
    from prefixquant_jax.quant.presets import Preset

    defaults = {f.name: f.default for f in dataclasses.fields(Preset) if f.default is not dataclasses.MISSING}
    return {k: v for k, v in preset.items() if k != "description" and (k not in defaults or v != defaults[k])}


def finetune(qm, tokenizer, cfg: TrainConfig, *, calib_data: str = "wikitext2-valid", train_dir: str | None = None,
             resume: bool = False, overwrite: bool = False, groups=None, progress: bool = True,
             fingerprint: dict | None = None) -> dict:
    """Fine-tune `qm.model` (a QuantizedModel from `quantize`) in place against `qm.fp_model`.

    With `train_dir`, the post-calibration quant params, each finished block and (every
    cfg.ckpt_every steps) the running block are checkpointed there; `resume=True` continues a run
    (when that directory holds the post-calibration state, calibration may be skipped before this
    call: it is restored here). `groups`: the trainer's parameter groups (default: prefixquant_groups(cfg)).
    Returns {"config", "groups": [{"group", "lr"}] as trained, "blocks": per-block logs, "seconds"}.
    """
    t0 = time.time()
    groups = groups or prefixquant_groups(cfg)
    tokens = calibration_samples(tokenize(tokenizer, load_text(calib_data)), cfg.samples, cfg.seqlen, cfg.seed)
    x0 = np.asarray(qm.model.embed[...][jnp.asarray(tokens)], np.float32)
    td = None
    if train_dir is not None:
        fp = {"preset": preset_fingerprint(dataclasses.asdict(qm.preset)), "prefix_tokens": list(qm.report.get("prefix_tokens", [])),
              "calib_data": calib_data, "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "ckpt_every"},
              **(fingerprint or {})}
        td = TrainDir(train_dir, fp, resume=resume, overwrite=overwrite,
                      normalize={"preset": preset_fingerprint})
        if resume and td.has("init"):
            set_qparams(qm.model, td.load_init())
        else:
            td.save_init(qparams_tree(qm.model))
    try:
        logs = train_blockwise(qm.fp_model, qm.model, x0, qm.prefix_kv, cfg, groups, td, progress)
    finally:
        if td is not None:
            td.close()
    # what was trained, at which lr: with explicit groups (FlatQuant) cfg.lr_* / train_weights do not apply
    trained = [{"group": g.name, "lr": g.lr} for g in groups]
    return {"config": dataclasses.asdict(cfg), "groups": trained, "blocks": logs, "seconds": time.time() - t0}
