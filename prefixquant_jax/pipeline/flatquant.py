"""FlatQuant in the quantize pipeline: init the transforms, train them block-wise, merge.

`stages.quantize` calls `init_flatquant` where PrefixQuant would set RTN weight scales (no rotation: the learned
transforms replace the Hadamards), runs the static grid search for the `-static-prefix` preset as usual, then
`train_and_merge`: FlatQuant always trains.

Training uses the generic block-wise trainer (pipeline/train.py) with `flatquant_groups`: the transforms and
per-channel scales (TransformParam) at `lr`, the LWC/LAC logits (ClipLogit) at `clip_lr` (FlatQuant's code:
10 x lr), and for static presets the activation/KV scales (QuantParam) at the trainer's lr_quant; the weights stay
frozen. The paper: 128 samples x 2048 tokens, 15 epochs, batch 4, AdamW at lr 5e-3 with a cosine schedule
(TRAIN_PRESETS["flatquant-paper"]); the CPU default is the trainer's `fast` preset (32 x 512, 4 epochs).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefixquant_jax.flatquant.merge import merge_model
from prefixquant_jax.flatquant.transforms import KRON_SITES, ClipLogit, TransformParam, init_block, positive_scales
from prefixquant_jax.nn.decoder import with_recipe
from prefixquant_jax.nn.variables import QuantParam
from prefixquant_jax.options import FlatOptions
from prefixquant_jax.pipeline.finetune import train_quantized
from prefixquant_jax.pipeline.train import ParamGroup, positive_quant_scales
from prefixquant_jax.prefix.outliers import sown_batches
from prefixquant_jax.quant.recipe import sown_value


def flatquant_groups(lr: float = 5e-3, clip_lr: float | None = None, quant_lr: float | None = None) -> tuple:
    """Trainer groups: ClipLogit (first: it is also a TransformParam) at clip_lr (10 x lr), the other
    TransformParams at lr (scales kept positive), QuantParam static scales at quant_lr when given."""
    groups = (ParamGroup("clip", ClipLogit, clip_lr if clip_lr is not None else 10 * lr),
              ParamGroup("transform", TransformParam, lr, positive_scales))
    if quant_lr is not None:
        groups += (ParamGroup("quant", QuantParam, quant_lr, positive_quant_scales),)
    return groups


class _ChannelMax:
    """Recipe that sows the per-channel max |x| at the inputs of the Kronecker transforms (FP model)."""

    def apply_site(self, name, x, qparams, block=None):
        if name in KRON_SITES:
            block.sow(nnx.Intermediate, name, jnp.abs(x.astype(jnp.float32)).max(axis=tuple(range(x.ndim - 1))))
        return x

    def product(self, name, x, block):
        return x @ block.linear_module(name).kernel[...]

    def bias(self, name, bias, block=None):
        return bias


def channel_absmax(model, tokens: np.ndarray, batch_size: int = 4, progress: bool = True) -> list[dict]:
    """Per layer {site: [n] max |x| over all calibration tokens} for qkv_in, up_gate_in, down_in, behind the
    model's prefix."""
    acc = [dict() for _ in model.layers]
    for inter in sown_batches(model, _ChannelMax(), tokens, batch_size, progress, "channel max"):
        for i, d in enumerate(acc):
            for site, v in inter["layers"][i].items():
                a = np.asarray(sown_value(v))
                d[site] = a if site not in d else np.maximum(d[site], a)
    return acc


def init_flatquant(fp_model, q_model, calib: np.ndarray, seed: int = 0, opts: FlatOptions | None = None,
                   progress: bool = True):
    """(q_model with its recipe in the chosen parameterization: a new model sharing q_model's weights, with the
    transforms of every block; a report). The SmoothQuant-style scales come from the FP model's channel maxima
    on `calib` behind the prefix."""
    opts = opts or FlatOptions()
    recipe = q_model.recipe.replace(param=opts.param)
    q_model = with_recipe(q_model, recipe)
    stats = channel_absmax(fp_model, calib, progress=progress) if opts.start == "random" else [None] * len(q_model.layers)
    lac_sites = [s for s, spec in recipe.sites if spec.dynamic] if opts.lac else []
    for i, blk in enumerate(q_model.layers):
        init_block(blk, q_model.config, (seed, i), opts.param, stats[i], opts.alpha,
                   lwc=opts.lwc and recipe.weight is not None, lac_sites=lac_sites, start=opts.start)
    return q_model, {"param": opts.param, "start": opts.start, "alpha": opts.alpha, "lr": opts.lr, "lwc": opts.lwc,
                     "lac": lac_sites}


def _nonempty(groups, block):
    """Drop the clip group when LWC and LAC are both off (static scales may be restored only later, on resume)."""
    return tuple(g for g in groups if g.name != "clip" or jax.tree.leaves(nnx.state(block, g.filter)))


def method_fingerprint(opts: FlatOptions | None) -> dict:
    """FlatQuant's part of a training run's fingerprint (pipeline/finetune.py): the options that change the run."""
    opts = opts or FlatOptions()
    return {"flat_lr": opts.lr, "flat_param": opts.param, "flat_alpha": opts.alpha, "flat_start": opts.start}


def train_and_merge(qm, tokens, train, opts: FlatOptions | None = None, checkpoint=None,
                    progress: bool = True, mesh=None):
    """Train the transforms of `qm.model` block by block against `qm.fp_blocks` on `tokens` with the TrainConfig
    `train` (checkpointed by the TrainCheckpoint `checkpoint`), then merge (flatquant.merge_model). Returns a new
    QuantizedModel (the merged one; its report has "train" and "flatquant"). With a callable opts.train, that runs
    the training."""
    opts = opts or FlatOptions()
    static = any(not spec.dynamic for _, spec in qm.recipe.sites)
    quant_lr = (5e-5 if train is None else train.lr_quant) if static else None
    groups = _nonempty(flatquant_groups(opts.lr, opts.clip_lr, quant_lr), qm.model.layers[0])
    report = dict(qm.report)
    if callable(opts.train):
        report["train"] = opts.train(qm, groups)
    else:
        report["train"] = train_quantized(qm, tokens, train, groups=groups, checkpoint=checkpoint,
                                          fingerprint=method_fingerprint(opts), progress=progress, mesh=mesh)
    rep = report["flatquant"] = dict(report.get("flatquant", {}))
    model = qm.model
    if opts.merge:
        model, rep["max_condition"] = merge_model(model, opts.cond_max)
    rep["merged"] = bool(opts.merge)
    return qm.replace(model=model, report=report)
