"""The quantization pipeline, its stages in order:

    prefix ids   outlier tokens of the unrotated FP model (prefix/outliers.py), or given / imported
    rotate       R1/R2 fused into the weights, one layer at a time (rotate/fuse.py); R3/R4 stay online
    prefix KV    the FP model's K/V of the prefix tokens: model state from here on (nn/decoder.py)
    weights      FlatQuant: its transforms (pipeline/flatquant.py); PrefixQuant: RTN scales, or the calibration
                 pass's output-aware clip and GPTQ
    calibrate    static activation / KV scales, grid-searched block by block (pipeline/calibrate.py)
    train        block-wise fine-tuning (pipeline/train.py); FlatQuant always trains, then merges

`quantize(checkpoint, calib_tokens, recipe, options, train=, train_tokens=, checkpoint=, mesh=)` returns a
QuantizedModel. The public entry point is api.quantize (names and paths in, options checked).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from checkpoints_convert.lazy import streamed
from prefixquant_jax.errors import UserError
from prefixquant_jax.nn.decoder import WEIGHT_NAMES, Decoder, with_prefix, with_recipe
from prefixquant_jax.options import QuantizeOptions, TrainCheckpoint, TrainConfig, train_config
from prefixquant_jax.pipeline.calibrate import CLIP_GRID, calibrate, gptq_at_scales
from prefixquant_jax.pipeline.finetune import train_quantized, train_tokens as checked_train_tokens
from prefixquant_jax.pipeline.flatquant import init_flatquant, train_and_merge
from prefixquant_jax.pipeline.fp_blocks import FPBlocks
from prefixquant_jax.pipeline.result import QuantizedModel
from prefixquant_jax.pipeline.train_dir import TrainDir
from prefixquant_jax.prefix.outliers import find_prefix
from prefixquant_jax.prefix.prefix_kv import compute_prefix_kv
from prefixquant_jax.quant.ops import weight_scale
from prefixquant_jax.rotate.fuse import LazyRotation, RotationConfig

# FlatQuant's static calibration keeps its original rules (RESULTS.md's flatquant-*-static-prefix rows)
FLATQUANT_RULES = {"kv_rule": "site", "search": "greedy", "target": "fp"}


def init_weight_scales(model: Decoder, spec, progress=True) -> None:
    """RTN init: per-output-channel scale of every linear kernel (MSE-searched clip) into
    qparams[<name>]["scale"]; the kernels stay FP and the recipe fake-quantizes them. Embed/head stay FP."""
    f = jax.jit(lambda w: weight_scale(w, spec, CLIP_GRID))
    for blk in tqdm(model.layers, desc="weights", disable=not progress, leave=False):
        for name in WEIGHT_NAMES:
            blk.set_quantizer(name, f(blk.linear_module(name).kernel[...]))


def calibration_tokens(calib_tokens) -> np.ndarray:
    """Calibration samples as int32 [N, L] (N >= 1, L >= 2); UserError otherwise."""
    a = np.asarray(calib_tokens)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 2 or not np.issubdtype(a.dtype, np.integer):
        raise UserError(f"calibration tokens must be an integer array [samples, seqlen], got {a.dtype}{list(a.shape)}")
    return a.astype(np.int32)


def needs_calibration(recipe, opts: QuantizeOptions) -> bool:
    """Whether quantizing with `recipe` and `opts` uses calibration tokens (an FP recipe, or data-free RTN weights
    without a prefix nor static scales, does not)."""
    return bool(recipe.prefix or recipe.is_static or recipe.method == "flatquant" or opts.gptq
                or (recipe.weight is not None and opts.weight_clip == "output"))


def _check_positions(config, prefix_len: int, calib, train_tokens) -> None:
    for what, a in (("calibration", calib), ("training", train_tokens)):
        if a is not None and a.shape[1] + prefix_len > config.max_position_embeddings:
            raise UserError(f"{what} tokens of length {a.shape[1]} (+ prefix {prefix_len}) exceed the model's max "
                            f"positions {config.max_position_embeddings}")


def _training(recipe, opts: QuantizeOptions, train, train_tokens, checkpoint):
    """(TrainConfig or None, training tokens or None, opts), checked before any slow stage."""
    flat = recipe.method == "flatquant"
    if opts.flatquant is not None and not flat:
        raise UserError(f"QuantizeOptions.flatquant applies to FlatQuant recipes, not {recipe.name!r}",
                        "QuantizeOptions.flatquant")
    if train is not None and not isinstance(train, TrainConfig):
        raise UserError(f"train must be a TrainConfig or None, got {type(train).__name__}")
    hook = flat and opts.flatquant is not None and callable(opts.flatquant.train)  # it trains on its own data
    if flat and train is None and not hook:  # FlatQuant always trains: the `fast` preset, sized to the tokens
        train = train_config("fast")
        if train_tokens is not None and np.ndim(train_tokens) == 2:
            n, L = np.shape(train_tokens)
            train = dataclasses.replace(train, samples=n, seqlen=L, batch_size=min(train.batch_size, n))
    if checkpoint is not None:
        if not isinstance(checkpoint, TrainCheckpoint):
            raise UserError(f"checkpoint must be a TrainCheckpoint or None, got {type(checkpoint).__name__}")
        if train is None:
            raise UserError("a TrainCheckpoint checkpoints a training run: give train=TrainConfig(...)")
        checkpoint.check()
        if checkpoint.resume:
            TrainDir.check_format(checkpoint.dir)
        if checkpoint.restores_calibration:  # the calibrated scales are restored from DIR/init
            opts = dataclasses.replace(opts, calibrate=False)
    if train is None or hook:
        return train, None, opts
    if train_tokens is None:
        raise UserError("training needs train_tokens: int [TrainConfig.samples, TrainConfig.seqlen]")
    return train, checked_train_tokens(train_tokens, train), opts


def _prefix_ids(ck, recipe, opts: QuantizeOptions, calib, report: dict) -> list[int] | None:
    """Stage 1: the prefix token ids (imported with its K/V, given, or found on the unrotated FP model)."""
    if not recipe.prefix:
        return None
    if opts.prefix_kv is not None:  # imported: the caller checked kv heads and head_dim against the model
        pkv = opts.prefix_kv
        if pkv.k_rotated != recipe.rotate or len(pkv.k) != ck.config.num_layers:
            raise UserError(f"the given prefix KV (k_rotated={pkv.k_rotated}, {len(pkv.k)} layers) does not fit "
                            f"{recipe.name!r} (rotated={recipe.rotate}, {ck.config.num_layers} layers)")
        ids = list(pkv.prefix_ids)
        report["outliers"] = {"prefix_ids": ids, "source": "imported"}
    elif opts.prefix_ids:
        ids = list(opts.prefix_ids)
        report["outliers"] = {"prefix_ids": ids, "source": "given"}
    else:  # on the unrotated FP model, dropped before the rotated one is built
        plain = Decoder(ck.config, streamed(ck.params))
        choice, _ = find_prefix(plain, calib[:opts.outlier_samples], opts.eta, opts.progress)
        del plain
        ids = choice["prefix_ids"]
        report["outliers"] = choice
    if not ids:
        raise UserError("the prefix is empty: the model has no BOS id and no outlier token passed eta; "
                        "lower QuantizeOptions.eta", "QuantizeOptions.eta")
    return ids


def _rotated(ck, recipe, seed: int):
    """Stage 2: (config, params, rotation or None): the checkpoint's params, folded and rotated one layer at a time
    when the recipe rotates (rotate.fuse.LazyRotation), else as they are (read one layer at a time)."""
    if not recipe.rotate:
        return ck.config, streamed(ck.params), None
    rotation = LazyRotation(ck.params, ck.config, RotationConfig(seed=seed))
    return rotation.config, rotation.params, rotation


def quantize(ck, calib_tokens, recipe, opts: QuantizeOptions = QuantizeOptions(), *,
             train: TrainConfig | None = None, train_tokens=None, checkpoint: TrainCheckpoint | None = None,
             mesh=None) -> QuantizedModel:
    """The pipeline (module docstring) of the FP checkpoint `ck` (pipeline input: .config, .params) with `recipe`,
    calibrated on `calib_tokens` (int [N, L]; None only for recipes that need none: needs_calibration). `train`: a
    TrainConfig, block-wise fine-tuning after calibration on `train_tokens` (int [train.samples, train.seqlen]);
    FlatQuant always trains (train None: the `fast` preset, sized to train_tokens). `checkpoint`: a TrainCheckpoint
    for the training run (a resume restores the calibrated scales). `mesh`: a parallel.sharding.MeshSpec that
    calibration and training run their blocks on (weights split over `model`, samples over `data`); None:
    calibration on one device, training's batch over all jax.devices()."""
    recipe.check()
    flat = recipe.method == "flatquant"
    mesh = None if mesh is None else mesh.make_for(ck.config)  # widths and device count checked now
    train, train_tokens, opts = _training(recipe, opts, train, train_tokens, checkpoint)
    calib = None if calib_tokens is None else calibration_tokens(calib_tokens)
    if calib is None and needs_calibration(recipe, opts):
        raise UserError(f"{recipe.name!r} needs calibration tokens (int [samples, seqlen])")
    if opts.gptq and recipe.weight is None:
        raise UserError(f"QuantizeOptions.gptq needs a recipe with quantized weights, not {recipe.name!r}",
                        "QuantizeOptions.gptq")
    if opts.gptq and flat and not opts.flatquant.merge:
        raise UserError("QuantizeOptions.gptq with FlatQuant runs on the merged kernels: FlatOptions.merge must be on",
                        "QuantizeOptions.gptq")
    if opts.prefix_ids and max(opts.prefix_ids) >= ck.config.vocab_size:
        raise UserError(f"QuantizeOptions.prefix_ids: id {max(opts.prefix_ids)} is outside the vocabulary "
                        f"({ck.config.vocab_size})", "QuantizeOptions.prefix_ids")
    known_p = len(opts.prefix_ids or ()) if opts.prefix_kv is None else opts.prefix_kv.length
    _check_positions(ck.config, known_p if recipe.prefix else 0, calib, train_tokens)
    times, report = {}, {"recipe": recipe.name, "seed": opts.seed, "eta": opts.eta}
    # Host memory grows with the block, not the model (issue [L]): the checkpoint's layers are read (and rotated)
    # one at a time, the only whole model held is the quantized one (the FP model of the outlier statistics is
    # dropped before it is built; calibration's FP blocks share its arrays, block by block).
    t = time.time()
    prefix_ids = _prefix_ids(ck, recipe, opts, calib, report)
    times["outliers"] = time.time() - t

    t = time.time()
    config, params, rotation = _rotated(ck, recipe, opts.seed)
    q_model = Decoder(config, params, recipe=recipe)  # one layer of params at a time
    if rotation is not None:
        rotation.release()
    fp_recipe = recipe.fp_reference()
    times["rotate"] = time.time() - t

    if prefix_ids is not None:
        t = time.time()  # on the FP model: q_model's kernels are still the FP ones
        prefix_kv = opts.prefix_kv or compute_prefix_kv(with_recipe(q_model, fp_recipe), prefix_ids,
                                                        k_rotated=recipe.rotate)
        q_model = with_prefix(q_model, prefix_kv)
        times["prefix"] = time.time() - t
        _check_positions(config, prefix_kv.length, calib, train_tokens)
    report["prefix_ids"] = list(prefix_ids or [])

    t = time.time()
    if flat:  # learned transforms instead of rotations; weights quantized with LWC in the forward
        q_model, report["flatquant"] = init_flatquant(with_recipe(q_model, fp_recipe), q_model, calib, opts.seed,
                                                      opts.flatquant, opts.progress)
    weight_pass = not flat and recipe.weight is not None and (opts.weight_clip == "output" or opts.gptq)
    if not flat and recipe.weight is not None and not weight_pass:
        init_weight_scales(q_model, recipe.weight, opts.progress)
    times["weights"] = time.time() - t
    static_calib = recipe.is_static and opts.calibrate
    calib_x = None  # the embedded calibration tokens, for the block-by-block passes that read them
    if weight_pass or static_calib or (flat and opts.gptq):
        calib_x = np.asarray(jnp.asarray(params["embed"])[jnp.asarray(calib)], np.float32)
    if weight_pass or static_calib:  # block by block on the embedded calibration tokens
        t = time.time()
        fp_blocks = FPBlocks.of_model(q_model, fp_recipe)  # read by calibrate one block at a time
        if flat:  # FlatQuant: its original rules, static scales only
            rules = dataclasses.replace(opts, gptq=False, gptq_inputs="fp", **FLATQUANT_RULES)  # GPTQ: after the merge
            report["calibration"] = calibrate(fp_blocks, q_model, calib_x, rules, weight_clip=None, static=True,
                                              progress=opts.progress, mesh=mesh)
        else:  # a resumed training run redoes data-dependent weights (deterministic) and restores the static scales
            rules = opts
            report["calibration"] = calibrate(fp_blocks, q_model, calib_x, opts,
                                              weight_clip=opts.weight_clip if weight_pass else None,
                                              static=opts.calibrate or weight_pass, progress=opts.progress, mesh=mesh)
        report["calibration_rules"] = {"weight_clip": None if flat or recipe.weight is None else rules.weight_clip,
                                       **{k: getattr(rules, k) for k in ("gptq", "kv_rule", "search", "target",
                                                                         "grid_samples")}}
        if opts.gptq:  # the order, and the quantity GPTQ minimises, per token, for the clip rule's rounding and GPTQ
            report["calibration_rules"]["gptq_order"] = "act" if opts.gptq_act_order else "natural"
            report["calibration_rules"]["gptq_inputs"] = opts.gptq_inputs
        if opts.gptq and not flat:  # (FlatQuant: gptq_at_scales after the merge)
            report["gptq"] = [{"layer": r["layer"], "rtn_err": {n: e[opts.weight_clip] for n, e in r["weights"].items()},
                               "gptq_err": {n: e["gptq"] for n, e in r["weights"].items()}}
                              for r in report["calibration"]]
        times["calibrate"] = time.time() - t
    del params
    fp_blocks = None
    if train is not None:  # the FP reference of training: read (and rotated) from the checkpoint block by block
        fp_config, fp_params, _ = _rotated(ck, recipe, opts.seed)
        fp_blocks = FPBlocks(fp_config, fp_params, fp_recipe, q_model.prefix_kv)
    qm = QuantizedModel(model=q_model, report=report, fp_blocks=fp_blocks)
    if flat:  # FlatQuant always trains, then folds the transforms into the weights
        t = time.time()
        qm = train_and_merge(qm, train_tokens, train, opts.flatquant, checkpoint, opts.progress, mesh)
        times["train_merge"] = time.time() - t
        if opts.gptq:  # FlatQuant-GPTQ: codes for the merged kernels on their LWC scales, transformed inputs' Grams
            t = time.time()
            qm.report["gptq"] = gptq_at_scales(qm.model, calib_x, opts, opts.progress, mesh)
            times["gptq"] = time.time() - t
    elif train is not None:  # PrefixQuant fine-tuning: scales and (train.train_weights) weights, block by block
        t = time.time()
        report["train"] = train_quantized(qm, train_tokens, train, checkpoint=checkpoint, progress=opts.progress,
                                          mesh=mesh, fingerprint=_train_fingerprint(recipe, opts))
        times["train"] = time.time() - t
    qm.report["seconds"] = times
    return qm


def _train_fingerprint(recipe, opts: QuantizeOptions) -> dict:
    """PrefixQuant's part of a training run's fingerprint: the rules that decide the calibrated start (a resume
    must use the same)."""
    rules = {"weight_clip": opts.weight_clip, "kv_rule": opts.kv_rule, "search": opts.search, "target": opts.target}
    gptq = {"gptq_damp": opts.gptq_damp, "gptq_act_order": opts.gptq_act_order} if opts.gptq else {}
    return {**gptq, "rules": rules}
