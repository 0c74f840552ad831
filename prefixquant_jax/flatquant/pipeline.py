"""FlatQuant in the quantize pipeline: init the transforms, train them block-wise, merge.

`quantize()` (pipeline.py) calls `init_flatquant` where PrefixQuant would set RTN weight scales
(no rotation: the learned transforms replace the Hadamards), runs the static grid search for the
`-static-prefix` preset as usual, then `train_and_merge`: FlatQuant always trains.

The training tokens and TrainConfig come from `quantize(..., train=, train_tokens=)`, checkpointed like
PrefixQuant's fine-tuning (TrainCheckpoint). Training uses the generic block-wise trainer
(train/blockwise.py) with `flatquant_groups`: the transforms and per-channel scales (TransformParam) at
`lr`, the LWC/LAC logits (ClipParam) at
`clip_lr` (FlatQuant's code: 10 x lr), and for static presets the activation/KV scales (QuantParam) at
the trainer's lr_quant; the weights stay frozen. The paper: 128 samples x 2048 tokens, 15 epochs,
batch 4, AdamW at lr 5e-3 with a cosine schedule (TRAIN_PRESETS["flatquant-paper"]); the CPU default is
the trainer's `fast` preset (32 x 512, 4 epochs).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefixquant_jax.flatquant.merge import merge_model
from prefixquant_jax.flatquant.recipe import SITE_TRANSFORM
from prefixquant_jax.flatquant.transforms import COND_MAX, ClipParam, TransformParam, init_block, positive_scales
from prefixquant_jax.errors import UserError
from prefixquant_jax.model import QuantParam, with_recipe
from prefixquant_jax.options import require_choice, require_number
from prefixquant_jax.prefix.outliers import sown_batches
from prefixquant_jax.quant.recipe import sown_value


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlatOptions:
    """FlatQuant's own options (how long and on what it trains: quantize's TrainConfig and tokens).
    `train`: None, or a callable (qm, groups) -> report that runs the training step instead (to watch it)."""

    param: str = "inverse"  # or "orthogonal"
    alpha: float = 0.3  # SmoothQuant-style init of the per-channel scales
    lr: float = 5e-3
    clip_lr: float | None = None  # None: 10 x lr
    lwc: bool = True
    lac: bool = True
    cond_max: float = COND_MAX
    train: Any = None
    merge: bool = True

    def __post_init__(self):
        require_choice(self, "param", ("inverse", "orthogonal"))
        require_number(self, "lr", 0.0, strict=True)
        if self.clip_lr is not None:
            require_number(self, "clip_lr", 0.0, strict=True)
        require_number(self, "alpha", 0.0, strict=False, high=1.0)
        require_number(self, "cond_max", 1.0, strict=True)
        if self.train is not None and not callable(self.train):
            raise UserError(f"FlatOptions.train must be None or a callable (qm, groups) -> report, got "
                            f"{type(self.train).__name__} (a TrainConfig goes to quantize(train=...))", "FlatOptions.train")


def flatquant_groups(lr: float = 5e-3, clip_lr: float | None = None, quant_lr: float | None = None) -> tuple:
    """Trainer groups: ClipParam (first: it is also a TransformParam) at clip_lr (10 x lr), the other
    TransformParams at lr (scales kept positive), QuantParam static scales at quant_lr when given."""
    from prefixquant_jax.train.blockwise import ParamGroup, _positive_scales

    groups = (ParamGroup("clip", ClipParam, clip_lr if clip_lr is not None else 10 * lr),
              ParamGroup("transform", TransformParam, lr, positive_scales))
    if quant_lr is not None:
        groups += (ParamGroup("quant", QuantParam, quant_lr, _positive_scales),)
    return groups


@dataclasses.dataclass(frozen=True)
class _ChannelMax:
    """Recipe that sows the per-channel max |x| at the inputs of the Kronecker transforms (FP model)."""

    def apply_site(self, name, x, qparams, block=None):
        if name in SITE_TRANSFORM:
            block.sow(nnx.Intermediate, name, jnp.abs(x.astype(jnp.float32)).max(axis=tuple(range(x.ndim - 1))))
        return x

    def apply_weight(self, name, kernel, qparams, block=None):
        return kernel


def channel_absmax(model, tokens: np.ndarray, prefix_kv=None, batch_size: int = 4, progress: bool = True) -> list[dict]:
    """Per layer {site: [n] max |x| over all calibration tokens} for qkv_in, up_gate_in, down_in."""
    acc = [dict() for _ in model.layers]
    for inter in sown_batches(model, _ChannelMax(), tokens, prefix_kv, batch_size, progress, "channel max"):
        for i, d in enumerate(acc):
            for site, v in inter["layers"][i].items():
                a = np.asarray(sown_value(v))
                d[site] = a if site not in d else np.maximum(d[site], a)
    return acc


def init_flatquant(fp_model, q_model, recipe, calib: np.ndarray, prefix_kv, seed: int = 0,
                   opts: FlatOptions | None = None, progress: bool = True):
    """q_model with `recipe` in the chosen parameterization (with_recipe: a new model sharing q_model's weights)
    and, in every block, its transforms (SmoothQuant-style scales from the FP model's channel maxima on
    `calib` behind the prefix). Returns (model, recipe, report)."""
    opts = opts or FlatOptions()
    recipe = recipe.replace(param=opts.param)
    q_model = with_recipe(q_model, recipe)
    stats = channel_absmax(fp_model, calib, prefix_kv, progress=progress)
    lac_sites = [s for s, spec in recipe.sites if spec.dynamic] if opts.lac else []
    for i, blk in enumerate(q_model.layers):
        init_block(blk, q_model.config, (seed, i), opts.param, stats[i], opts.alpha,
                   lwc=opts.lwc and recipe.weight is not None, lac_sites=lac_sites)
    return q_model, recipe, {"param": opts.param, "alpha": opts.alpha, "lr": opts.lr, "lwc": opts.lwc, "lac": lac_sites,
                    "kv_original_space": recipe.kv_original_space}


def _nonempty(groups, block):
    """Drop the clip group when LWC and LAC are both off (static scales may be restored only later, on resume)."""
    return tuple(g for g in groups if g.name != "clip" or jax.tree.leaves(nnx.state(block, g.filter)))


def method_fingerprint(opts: FlatOptions | None) -> dict:
    """FlatQuant's part of a training run's fingerprint (train/finetune.py): the options that change the run."""
    opts = opts or FlatOptions()
    return {"flat_lr": opts.lr, "flat_param": opts.param, "flat_alpha": opts.alpha}


def train_and_merge(qm, tokens, train, opts: FlatOptions | None = None, checkpoint=None,
                    progress: bool = True, mesh=None) -> None:
    """Train the transforms of `qm.model` block by block against `qm.fp_model` on `tokens` with the
    TrainConfig `train` (checkpointed by the TrainCheckpoint `checkpoint`), then merge (qm.model becomes the
    merged model, flatquant.merge_model); reports go to qm.report["train"] and qm.report["flatquant"]. With a
    callable opts.train, that runs the training."""
    from prefixquant_jax.train.finetune import train_quantized

    opts = opts or FlatOptions()
    static = any(not spec.dynamic for _, spec in qm.model.layers[0].recipe.sites)
    quant_lr = (5e-5 if train is None else train.lr_quant) if static else None
    groups = _nonempty(flatquant_groups(opts.lr, opts.clip_lr, quant_lr), qm.model.layers[0])
    if callable(opts.train):
        qm.report["train"] = opts.train(qm, groups)
    else:
        qm.report["train"] = train_quantized(qm, tokens, train, groups=groups, checkpoint=checkpoint,
                                             fingerprint=method_fingerprint(opts), progress=progress, mesh=mesh)
    rep = qm.report.setdefault("flatquant", {})
    if opts.merge:
        qm.model, rep["max_condition"] = merge_model(qm.model, opts.cond_max)
    rep["merged"] = bool(opts.merge)
