"""The options of `quantize` (api.py): frozen dataclasses that check themselves when built.

    QuantizeOptions   outlier threshold, prefix, GPTQ, the initialisation rules (one set of calibration defaults)
    FlatOptions       FlatQuant's own: parameterization, smoothing init, learning rates, LWC/LAC
    TrainConfig       block-wise fine-tuning (PrefixQuant FT; FlatQuant trains its transforms with it)
    TrainCheckpoint   where the fine-tuning run is checkpointed, and whether it resumes one

A bad value raises `UserError` (a ValueError) whose one-line message names the field as `Class.field`;
`UserError.fields` lists those names (the CLI puts its flag names in their place).
"""
from __future__ import annotations

import dataclasses
import math
import os

from typing import Any

from prefixquant_jax.errors import UserError
from prefixquant_jax.flatquant.transforms import COND_MAX, PARAMS


def require_int(obj, names, low: int) -> None:
    for k in names:
        v = getattr(obj, k)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            f = f"{type(obj).__name__}.{k}"
            raise UserError(f"{f} must be an integer >= {low}, got {v!r}", f)


def require_choice(obj, name: str, allowed) -> None:
    v, f = getattr(obj, name), f"{type(obj).__name__}.{name}"
    if v not in allowed:
        raise UserError(f"{f} must be one of {', '.join(map(str, allowed))}, got {v!r}", f)


def require_number(obj, name: str, low: float, strict: bool, high: float | None = None) -> None:
    """A finite number > low (strict) or >= low, and <= high when given."""
    v, f = getattr(obj, name), f"{type(obj).__name__}.{name}"
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > low if strict else v >= low) and (high is None or v <= high)
    if not ok:
        bound = f"{'>' if strict else '>='} {low:g}" + ("" if high is None else f" and <= {high:g}")
        raise UserError(f"{f} must be a number {bound}, got {v!r}", f)


WEIGHT_CLIPS, KV_RULES, SEARCHES, TARGETS = ("output", "mse"), ("head", "site"), ("greedy", "alone"), ("local", "fp")
GPTQ_INPUTS = ("fp", "quantized")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizeOptions:
    outlier_samples: int = 8  # calibration samples scanned for outlier tokens
    grid_samples: int = 2
    eta: float = 64.0
    seed: int = 0
    prefix_ids: tuple[int, ...] | None = None  # override detection
    progress: bool = True
    calibrate: bool = True  # False: leave static scales unset (a resumed training run restores them)
    prefix_kv: object = None  # a PrefixKV to use (e.g. imported from a prefix file) instead of computing one
    flatquant: object = None  # FlatOptions for FlatQuant recipes (None: defaults)
    gptq: bool = False  # GPTQ weights (quant/gptq.py) instead of RTN, on the same per-channel scales
    gptq_damp: float = 0.01  # Hessian dampening, fraction of its mean diagonal
    gptq_act_order: bool = True  # quantize input channels by decreasing Hessian diagonal (quant/gptq.py)
    gptq_inputs: str = "fp"  # Grams from the FP block, or "quantized": sequential, dynamic quantizers on (calibrate.py)
    # PrefixQuant initialisation rules (calibrate.py; defaults chosen on calibration data, BENCHMARKS/RESULTS)
    weight_clip: str = "output"  # "output": output-aware per-channel clip; "mse": data-free ||W - Q(W)||
    kv_rule: str = "head"  # "head": per-head K (attention) / V clip; "site": one searched ratio per site
    search: str = "greedy"  # activation clip search: "greedy" (cumulative) or "alone"
    target: str = "local"  # search target: "local" (FP block on quantized inputs) or "fp" (FP block on FP inputs)

    def __post_init__(self):
        require_int(self, ("outlier_samples", "grid_samples"), 1)
        require_int(self, ("seed",), 0)
        require_number(self, "eta", 1.0, strict=True)
        require_number(self, "gptq_damp", 0.0, strict=True)
        require_choice(self, "weight_clip", WEIGHT_CLIPS)
        require_choice(self, "kv_rule", KV_RULES)
        require_choice(self, "search", SEARCHES)
        require_choice(self, "target", TARGETS)
        require_choice(self, "gptq_inputs", GPTQ_INPUTS)
        if self.gptq_inputs != "fp" and not self.gptq:
            raise UserError("QuantizeOptions.gptq_inputs 'quantized' needs gptq", "QuantizeOptions.gptq_inputs")
        if self.prefix_ids is not None:
            ids = tuple(self.prefix_ids)
            if not all(isinstance(t, int) or hasattr(t, "__index__") for t in ids) or any(int(t) < 0 for t in ids):
                raise UserError(f"QuantizeOptions.prefix_ids must be token ids >= 0, got {self.prefix_ids!r}",
                                "QuantizeOptions.prefix_ids")
            object.__setattr__(self, "prefix_ids", tuple(int(t) for t in ids))
            if self.prefix_kv is not None and self.prefix_ids:
                raise UserError("QuantizeOptions.prefix_ids and QuantizeOptions.prefix_kv exclude each other",
                                "QuantizeOptions.prefix_ids", "QuantizeOptions.prefix_kv")
        if self.flatquant is not None and not isinstance(self.flatquant, FlatOptions):
            raise UserError(f"QuantizeOptions.flatquant must be a FlatOptions, got {type(self.flatquant).__name__}",
                            "QuantizeOptions.flatquant")


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
        require_choice(self, "param", PARAMS)
        require_number(self, "lr", 0.0, strict=True)
        if self.clip_lr is not None:
            require_number(self, "clip_lr", 0.0, strict=True)
        require_number(self, "alpha", 0.0, strict=False, high=1.0)
        require_number(self, "cond_max", 1.0, strict=True)
        if self.train is not None and not callable(self.train):
            raise UserError(f"FlatOptions.train must be None or a callable (qm, groups) -> report, got "
                            f"{type(self.train).__name__} (a TrainConfig goes to quantize(train=...))", "FlatOptions.train")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to fine-tune. `samples` x `seqlen`: the training tokens' shape; `ckpt_every`: in-block checkpoint
    period in steps (0: only after each block)."""

    samples: int = 32
    seqlen: int = 512
    epochs: int = 2
    batch_size: int = 4
    lr_quant: float = 5e-5
    lr_weight: float = 5e-6
    weight_decay: float = 0.0
    final_lr_ratio: float = 0.1
    train_weights: bool = True
    ckpt_every: int = 0
    seed: int = 0

    def __post_init__(self):
        require_int(self, ("samples", "seqlen", "epochs", "batch_size"), 1)
        require_int(self, ("ckpt_every", "seed"), 0)
        for k in ("lr_quant", "lr_weight", "weight_decay"):
            require_number(self, k, 0.0, strict=False)
        require_number(self, "final_lr_ratio", 0.0, strict=False, high=1.0)
        if self.batch_size > self.samples:
            raise UserError(f"TrainConfig.batch_size {self.batch_size} exceeds the {self.samples} training samples "
                            "(TrainConfig.samples)", "TrainConfig.batch_size", "TrainConfig.samples")

    @property
    def steps_per_epoch(self) -> int:
        return self.samples // self.batch_size

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs


TRAIN_PRESETS = {
    # the paper: 512 samples x 1024 tokens, batch 4, 20 epochs (W4A4KV4; 10 for W4A8KV4)
    "paper": TrainConfig(samples=512, seqlen=1024, batch_size=4, epochs=20),
    # a CPU-sized default: 32 x 512, batch 4, 4 epochs (32 steps per block); see README for its cost
    "fast": TrainConfig(samples=32, seqlen=512, batch_size=4, epochs=4),
    # FlatQuant's paper recipe (its transforms' lr 5e-3 is flatquant.FlatOptions.lr): 128 x 2048, batch 4, 15 epochs
    "flatquant-paper": TrainConfig(samples=128, seqlen=2048, batch_size=4, epochs=15, train_weights=False),
}


def train_config(preset: str, a_bits: int | None = None, **overrides) -> TrainConfig:
    """TRAIN_PRESETS[preset] ("paper": 10 epochs when a_bits >= 8) with the overrides that are not None."""
    if preset not in TRAIN_PRESETS:
        raise UserError(f"unknown train preset {preset!r} (known: {', '.join(TRAIN_PRESETS)})", "train_config.preset")
    cfg = TRAIN_PRESETS[preset]
    if preset == "paper" and a_bits is not None and a_bits >= 8:
        cfg = dataclasses.replace(cfg, epochs=10)
    kw = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(cfg, **kw) if kw else cfg


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainCheckpoint:
    """Checkpoint the fine-tuning run in `dir` (the calibrated scales, every finished block, every
    TrainConfig.ckpt_every steps) so that a killed run loses at most one block; `resume=True` continues the
    run there (it must be the same run: model, preset, prefix, options, data); `overwrite=True` replaces a
    directory that holds another run. `identity`: JSON values that name the model and data in the run's
    fingerprint (its "calib_data", unless given: a digest of the training tokens)."""

    dir: str
    resume: bool = False
    overwrite: bool = False
    identity: dict | None = None

    def __post_init__(self):
        if not isinstance(self.dir, (str, os.PathLike)) or not str(self.dir):
            raise UserError(f"TrainCheckpoint.dir must be a directory path, got {self.dir!r}", "TrainCheckpoint.dir")
        object.__setattr__(self, "dir", os.fspath(self.dir))
        if self.identity is not None and not isinstance(self.identity, dict):
            raise UserError(f"TrainCheckpoint.identity must be a dict or None, got {type(self.identity).__name__}",
                            "TrainCheckpoint.identity")

    def check(self) -> None:
        """Fail now, not after calibration: a resume needs a training directory, a new run an empty one."""
        if self.resume:
            if not os.path.isfile(os.path.join(self.dir, "train.json")):
                raise UserError(f"TrainCheckpoint.resume: {self.dir} holds no train.json (not a training directory)",
                                "TrainCheckpoint.resume")
        elif os.path.isdir(self.dir) and os.listdir(self.dir) and not self.overwrite:
            raise UserError(f"training directory {self.dir} exists; set TrainCheckpoint.resume to continue it or "
                            "TrainCheckpoint.overwrite to replace it", "TrainCheckpoint.resume", "TrainCheckpoint.overwrite")

    @property
    def restores_calibration(self) -> bool:
        """A resume of a run whose calibrated scales are saved (DIR/init): calibration can be skipped."""
        return self.resume and os.path.isdir(os.path.join(self.dir, "init"))
