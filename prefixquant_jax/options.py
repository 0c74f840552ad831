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
from prefixquant_jax.flatquant.transforms import COND_MAX, PARAMS, STARTS


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric option (or command-line flag) can take: an int or a finite float, within
    [low, high] (`open_low`: > low). The one source of a field's range: the dataclass checks its value with it, and
    the command line's flag for the field parses with `arg` (cli/flags.py), so both refuse the same values with the
    same words, before anything is loaded."""

    kind: type = int
    low: float | None = None
    high: float | None = None
    open_low: bool = False

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.open_low else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"<= {self.high:g}")
        return " ".join([what] + [" and ".join(bounds)] if bounds else [what])

    def ok(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (self.kind is int and not isinstance(v, int)):
            return False
        if not math.isfinite(v):
            return False
        if self.low is not None and (v <= self.low if self.open_low else v < self.low):
            return False
        return self.high is None or v <= self.high

    def check(self, v, name: str):
        """v, or UserError naming `name`."""
        if not self.ok(v):
            raise UserError(f"{name} must be {self.describe()}, got {v!r}", name)
        return v

    def parse(self, text: str):
        """The value of a flag's text; ValueError with the allowed range when it is not one."""
        try:
            v = int(text) if self.kind is int else float(text)
        except (TypeError, ValueError):
            raise ValueError(f"must be {self.describe()}, got {text!r}") from None
        if not self.ok(v):
            raise ValueError(f"must be {self.describe()}, got {text!r}")
        return v


def ranged(default, kind=int, low=None, high=None, open_low=False):
    """A dataclass field with a Range (checked by check_ranges, read by the command line's flags)."""
    return dataclasses.field(default=default, metadata={"range": Range(kind, low, high, open_low)})


def field_range(cls, name: str) -> Range:
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata["range"]


def check_ranges(obj) -> None:
    """UserError for the first field of `obj` outside its Range (None passes for an optional field)."""
    for f in dataclasses.fields(obj):
        r = f.metadata.get("range")
        v = getattr(obj, f.name)
        if r is not None and not (v is None and f.default is None):
            r.check(v, f"{type(obj).__name__}.{f.name}")


def require_choice(obj, name: str, allowed) -> None:
    v, f = getattr(obj, name), f"{type(obj).__name__}.{name}"
    if v not in allowed:
        raise UserError(f"{f} must be one of {', '.join(map(str, allowed))}, got {v!r}", f)


WEIGHT_CLIPS, KV_RULES, SEARCHES, TARGETS = ("output", "mse"), ("head", "site"), ("greedy", "alone"), ("local", "fp")
GPTQ_INPUTS = ("fp", "quantized")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizeOptions:
    outlier_samples: int = ranged(8, low=1)  # calibration samples scanned for outlier tokens
    grid_samples: int = ranged(2, low=1)  # calibration samples used inside the clip searches
    eta: float = ranged(64.0, float, low=1.0, open_low=True)  # outlier: max|x| > eta x the sample's median
    seed: int = ranged(0, low=0)
    prefix_ids: tuple[int, ...] | None = None  # override detection
    progress: bool = True
    calibrate: bool = True  # False: leave static scales unset (a resumed training run restores them)
    prefix_kv: object = None  # a PrefixKV to use (e.g. imported from a prefix file) instead of computing one
    flatquant: object = None  # FlatOptions for FlatQuant recipes (None: defaults)
    gptq: bool = False  # GPTQ weights (quant/gptq.py) instead of RTN, on the same per-channel scales
    gptq_damp: float = ranged(0.01, float, low=0.0, high=1e3, open_low=True)  # Hessian dampening x its mean diagonal
    gptq_act_order: bool = True  # quantize input channels by decreasing Hessian diagonal (quant/gptq.py)
    gptq_inputs: str = "fp"  # Grams from the FP block, or "quantized": sequential, dynamic quantizers on (calibrate.py)
    # PrefixQuant initialisation rules (calibrate.py; defaults chosen on calibration data, BENCHMARKS/RESULTS)
    weight_clip: str = "output"  # "output": output-aware per-channel clip; "mse": data-free ||W - Q(W)||
    kv_rule: str = "head"  # "head": per-head K (attention) / V clip; "site": one searched ratio per site
    search: str = "greedy"  # activation clip search: "greedy" (cumulative) or "alone"
    target: str = "local"  # search target: "local" (FP block on quantized inputs) or "fp" (FP block on FP inputs)

    def __post_init__(self):
        check_ranges(self)
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
    start: str = "random"  # or "hadamard": the rotated model's Hadamards (flatquant/transforms.py init_block)
    alpha: float = ranged(0.3, float, low=0.0, high=1.0)  # SmoothQuant-style init of the per-channel scales
    lr: float = ranged(5e-3, float, low=0.0, high=1.0, open_low=True)
    clip_lr: float | None = ranged(None, float, low=0.0, high=10.0, open_low=True)  # None: 10 x lr
    lwc: bool = True
    lac: bool = True
    cond_max: float = ranged(COND_MAX, float, low=1.0, open_low=True)
    train: Any = None
    merge: bool = True

    def __post_init__(self):
        require_choice(self, "param", PARAMS)
        require_choice(self, "start", STARTS)
        check_ranges(self)
        if self.train is not None and not callable(self.train):
            raise UserError(f"FlatOptions.train must be None or a callable (qm, groups) -> report, got "
                            f"{type(self.train).__name__} (a TrainConfig goes to quantize(train=...))", "FlatOptions.train")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to fine-tune. `samples` x `seqlen`: the training tokens' shape; `ckpt_every`: in-block checkpoint
    period in steps (0: only after each block)."""

    samples: int = ranged(32, low=1)
    seqlen: int = ranged(512, low=1)
    epochs: int = ranged(2, low=1)
    batch_size: int = ranged(4, low=1)
    lr_quant: float = ranged(5e-5, float, low=0.0, high=1.0)
    lr_weight: float = ranged(5e-6, float, low=0.0, high=1.0)
    weight_decay: float = ranged(0.0, float, low=0.0, high=1.0)
    final_lr_ratio: float = ranged(0.1, float, low=0.0, high=1.0)
    train_weights: bool = True
    ckpt_every: int = ranged(0, low=0)
    seed: int = ranged(0, low=0)

    def __post_init__(self):
        check_ranges(self)
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
