"""The flags of `analyze` and `quantize`: their argument groups, the option fields library errors name -> our
flag names (flag_error), and the library options built from the parsed flags."""
from __future__ import annotations

import argparse

from prefixquant_jax.cli.args import (BITS, EXISTING_DIR, EXISTING_FILE, NEW_DIR, NEW_FILE, RATIO, add_eval_args,
                                      add_mesh_arg, add_model_args, corpus, number, option)
from prefixquant_jax.eval.data import BUNDLED_TEXTS
from prefixquant_jax.errors import UserError
from prefixquant_jax.flatquant.transforms import STARTS
from prefixquant_jax.options import FlatOptions, QuantizeOptions, TrainConfig, train_config
from prefixquant_jax.presets import PRESETS

def _add_calib_args(p):
    p.add_argument("--calib-data", default="wikitext2-valid", type=corpus(BUNDLED_TEXTS),
                   help="wikitext2-valid (bundled) or a UTF-8 text file")
    p.add_argument("--calib-samples", type=number(int, 1), default=32)
    p.add_argument("--calib-seqlen", type=number(int, 2), default=512)
    p.add_argument("--outlier-samples", type=option(QuantizeOptions, "outlier_samples"), default=8,
                   help="calibration samples scanned for outlier tokens")
    p.add_argument("--eta", type=option(QuantizeOptions, "eta"), default=64.0,
                   help="outlier threshold: max|x| > eta * median over the sample's tokens")
    p.add_argument("--seed", type=option(QuantizeOptions, "seed"), default=0)


def _add_rule_args(p):
    g = p.add_argument_group("PrefixQuant initialisation rules (defaults chosen on calibration data; see RESULTS.md)")
    g.add_argument("--weight-clip", choices=("output", "mse"), default="output",
                   help="per-channel weight clip: output-aware ||XW - XQ(W)|| on the calibration inputs, or data-free ||W - Q(W)||")
    g.add_argument("--kv-clip", choices=("head", "site"), default="head",
                   help="static KV clip: per head (K by attention error, V by reconstruction) or one searched ratio per site")
    g.add_argument("--clip-search", choices=("greedy", "alone"), default="greedy",
                   help="activation clip search: sites one after another with the others on, or each site alone")
    g.add_argument("--clip-target", choices=("local", "fp"), default="local",
                   help="search target: the FP block on the quantized model's inputs, or on the FP model's inputs")
    g.add_argument("--grid", choices=("full", "narrow"), default="full",
                   help="symmetric grid (PrefixQuant presets): 2 amax / (2^b - 1), or amax / (2^(b-1) - 1)")


def _add_train_args(p):
    g = p.add_argument_group("block-wise fine-tuning (PrefixQuant FT)")
    g.add_argument("--train", action="store_true", help="fine-tune scales and weights block by block after calibration")
    g.add_argument("--train-preset", default="fast", help="fast (CPU-sized, default) or paper (512 x 1024, batch 4, 20 epochs)")
    g.add_argument("--train-samples", type=option(TrainConfig, "samples"))
    g.add_argument("--train-seqlen", type=option(TrainConfig, "seqlen"))
    g.add_argument("--epochs", type=option(TrainConfig, "epochs"))
    g.add_argument("--train-batch-size", type=option(TrainConfig, "batch_size"),
                   help="samples per step (sharded over the devices)")
    g.add_argument("--lr-quant", type=option(TrainConfig, "lr_quant"),
                   help="learning rate of scales / zero points (default 5e-5)")
    g.add_argument("--lr-weight", type=option(TrainConfig, "lr_weight"),
                   help="learning rate of the linear weights (default 5e-6)")
    g.add_argument("--no-train-weights", action="store_true", help="train the quantizer parameters only")
    g.add_argument("--train-dir", metavar="DIR", type=NEW_DIR, help="checkpoint the run here (after calibration, every block, every --ckpt-every steps)")
    g.add_argument("--ckpt-every", type=option(TrainConfig, "ckpt_every"), default=0, help="in-block checkpoint period in steps (0: after each block only)")
    g.add_argument("--resume", metavar="DIR", type=EXISTING_DIR, help="continue the fine-tuning run checkpointed in DIR (implies --train)")


def _add_distributed_args(p):
    g = p.add_argument_group("several processes (jax.distributed; prefixquant_jax/distributed.py)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (or auto: JAX's cluster detection); "
                   "default: JAX_COORDINATOR_ADDRESS, if set")
    g.add_argument("--num-processes", type=number(int, 1), help="default: JAX_NUM_PROCESSES")
    g.add_argument("--process-id", type=number(int, 0), help="default: JAX_PROCESS_ID; process 0 alone writes files")


def _add_flat_args(p):
    g = p.add_argument_group("FlatQuant (presets flatquant-*: always trained with the --train flags, then merged)")
    g.add_argument("--flat-lr", type=option(FlatOptions, "lr"), default=5e-3, help="learning rate of the transforms (clip logits: 10x)")
    g.add_argument("--flat-param", choices=("inverse", "orthogonal"), default="inverse",
                   help="inverse: P learned directly, P^-1 = inv(P); orthogonal: P = U diag(s) V^T (Cayley)")
    g.add_argument("--flat-alpha", type=option(FlatOptions, "alpha"), default=0.3, help="SmoothQuant-style init of the per-channel scales")
    g.add_argument("--flat-start", choices=STARTS, default="random",
                   help="random: random orthogonal factors, SmoothQuant scales (FlatQuant's init); hadamard: the rotated "
                        "model's Hadamards (training starts where QuaRot / PrefixQuant stand)")


def _site_clips(text: str):
    """'R' or 'R,SITE=R,...' or 'SITE=R,...' -> (R or None, ((SITE, R), ...) or None), for argparse."""
    default, sites = None, []
    for part in text.split(","):
        site, _, r = part.rpartition("=")
        try:
            r = RATIO.range.parse(r)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{part.strip()!r}: a clip ratio {e} (R or SITE=R)") from None
        if site:
            sites.append((site.strip(), r))
        elif default is None:
            default = r
        else:
            raise argparse.ArgumentTypeError(f"two default clip ratios in {text!r}")
    return default, tuple(sites) or None


# option fields named in library errors (UserError.fields) -> the flags that set them
FLAGS = {
    "QuantizeOptions.outlier_samples": "--outlier-samples", "QuantizeOptions.grid_samples": "--grid-samples",
    "QuantizeOptions.eta": "--eta", "QuantizeOptions.seed": "--seed", "QuantizeOptions.prefix_ids": "--prefix-ids",
    "QuantizeOptions.prefix_kv": "--import-prefix", "QuantizeOptions.gptq": "--gptq",
    "QuantizeOptions.gptq_damp": "--gptq-damp", "QuantizeOptions.gptq_act_order": "--gptq-order",
    "QuantizeOptions.gptq_inputs": "--gptq-inputs",
    "QuantizeOptions.weight_clip": "--weight-clip", "QuantizeOptions.kv_rule": "--kv-clip",
    "QuantizeOptions.search": "--clip-search", "QuantizeOptions.target": "--clip-target",
    "TrainConfig.samples": "--train-samples", "TrainConfig.seqlen": "--train-seqlen", "TrainConfig.epochs": "--epochs",
    "TrainConfig.batch_size": "--train-batch-size", "TrainConfig.lr_quant": "--lr-quant",
    "TrainConfig.lr_weight": "--lr-weight", "TrainConfig.ckpt_every": "--ckpt-every", "TrainConfig.seed": "--seed",
    "TrainCheckpoint.dir": "--train-dir", "TrainCheckpoint.resume": "--resume", "TrainCheckpoint.overwrite": "--overwrite",
    "MeshSpec.model": "--mesh model", "FlatOptions.lr": "--flat-lr", "FlatOptions.param": "--flat-param", "FlatOptions.alpha": "--flat-alpha",
    "FlatOptions.start": "--flat-start",
    # arguments of the evaluation, runtime and checkpoint functions (every subcommand: cli.main)
    "log_path": "--eval-log", "max_windows": "--max-windows", "RuntimeRecipe.kernels": "--kernels",
    "backend 'fake'": "--backend fake", "backend 'real'": "--backend real", "pq.save": "`prefixquant quantize --save DIR`",
    "overwrite=True": "--overwrite", "preset.act_clip": "--dynamic-act-clip",
    "preset.act_site_clips": "--dynamic-act-clip SITE=R", "preset.kv_clip": "--dynamic-kv-clip",
}


def flag_error(e: UserError) -> UserError:
    """The library's error with our flag names in place of the option fields it names."""
    msg = str(e)
    for f in sorted(e.fields, key=len, reverse=True):
        msg = msg.replace(f, FLAGS.get(f, f))
    return UserError(msg)


def flat_options(args) -> FlatOptions:
    return FlatOptions(param=args.flat_param, lr=args.flat_lr, alpha=args.flat_alpha, start=args.flat_start)


def train_cfg(args, recipe) -> TrainConfig:
    name = "flatquant-paper" if recipe.method == "flatquant" and args.train_preset == "paper" else args.train_preset
    return train_config(name, recipe.a_bits, samples=args.train_samples, seqlen=args.train_seqlen,
                        epochs=args.epochs, batch_size=args.train_batch_size, lr_quant=args.lr_quant,
                        lr_weight=args.lr_weight, ckpt_every=args.ckpt_every, seed=args.seed,
                        train_weights=False if args.no_train_weights else None)


def add_analyze_parser(sub) -> None:
    p = sub.add_parser("analyze", help="find the outlier tokens and the prefix; plot activations before/after it")
    add_model_args(p, dtype=False)
    _add_calib_args(p)
    p.add_argument("--no-rotate", action="store_true", help="analyze the unrotated model")
    p.add_argument("--plot", metavar="OUT.png", type=NEW_FILE, help="write the outlier plot")


def add_quantize_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize with a preset, evaluate perplexity, print a table")
    add_model_args(p, dtype=False)
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    _add_calib_args(p)
    p.add_argument("--grid-samples", type=option(QuantizeOptions, "grid_samples"), default=2, help="calibration samples used inside the clip grid search")
    p.add_argument("--w-bits", type=BITS)
    p.add_argument("--a-bits", type=BITS)
    p.add_argument("--kv-bits", type=BITS)
    p.add_argument("--dynamic-act-clip", type=_site_clips, default=(None, None), metavar="R[,SITE=R...]",
                   help="clip ratio of per-token dynamic activation quantizers (scale from R x amax; preset default); "
                        "SITE=R overrides it at one site (qkv_in, o_in, up_gate_in, down_in), e.g. 0.85,down_in=0.8")
    p.add_argument("--dynamic-kv-clip", type=RATIO, metavar="R", help="the same for dynamic KV quantizers")
    p.add_argument("--prefix-ids", help="comma-separated token ids to use as the prefix instead of detecting them")
    p.add_argument("--gptq", action="store_true", 
                   help="GPTQ weights on the RTN scales (calibration inputs' Hessians) instead of RTN; FlatQuant: "
                        "after the merge, on the LWC scales, with the transformed inputs' Hessians")
    p.add_argument("--gptq-damp", type=option(QuantizeOptions, "gptq_damp"), default=0.01, help="GPTQ Hessian dampening, fraction of the mean diagonal")
    p.add_argument("--gptq-order", choices=("act", "natural"), default="act",
                   help="GPTQ input-channel order: 'act' largest Hessian diagonal first (default), 'natural' as stored")
    p.add_argument("--gptq-inputs", choices=("fp", "quantized"), default="fp",
                   help="GPTQ Hessians from the FP block (default) or 'quantized': q|k|v, o, gate|up, down in turn, "
                        "each from the block with the earlier linears' GPTQ weights and the dynamic quantizers on")
    _add_rule_args(p)
    _add_train_args(p)
    _add_flat_args(p)
    _add_distributed_args(p)
    add_mesh_arg(p, default="calibration on one device, training's batches over all devices on data; a --mesh: "
                            "calibration, training and the evaluation on it, one process only")
    add_eval_args(p, data_flag="--eval-data")
    p.add_argument("--no-fp", action="store_true", help="skip the FP reference evaluation (no fp_ppl / ratio)")
    p.add_argument("--no-eval", action="store_true", help="quantize only")
    p.add_argument("--export-prefix", metavar="FILE.safetensors", type=NEW_FILE, help="write the FP prefix KV (layers.{i}.key/value)")
    p.add_argument("--import-prefix", metavar="FILE.safetensors", type=EXISTING_FILE, help="use this prefix KV (export-prefix) instead of computing one")
    p.add_argument("--save", metavar="DIR", type=NEW_DIR, help="save the quantized model (Orbax state, metadata, tokenizer) to DIR; "
                   "an existing DIR needs --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --export-prefix file or --train-dir")


def quantize_options(args, **kw) -> QuantizeOptions:
    """QuantizeOptions of the calibration and rule flags (`analyze` has only the calibration ones)."""
    rules = {} if not hasattr(args, "weight_clip") else dict(
        grid_samples=args.grid_samples, gptq=args.gptq, gptq_damp=args.gptq_damp, gptq_act_order=args.gptq_order == "act",
        gptq_inputs=args.gptq_inputs,
        weight_clip=args.weight_clip, kv_rule=args.kv_clip, search=args.clip_search, target=args.clip_target)
    return QuantizeOptions(outlier_samples=args.outlier_samples, eta=args.eta, seed=args.seed, **rules, **kw)

