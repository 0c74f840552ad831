"""Subcommands `analyze` (outlier tokens, prefix choice, plot), `quantize` (run a preset, evaluate) and `export-hf`."""
from __future__ import annotations

import argparse
import dataclasses
import time

from prefixquant_jax.errors import UserError


def _add_calib_args(p):
    p.add_argument("--calib-data", default="wikitext2-valid", help="wikitext2-valid (bundled) or a UTF-8 text file")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--outlier-samples", type=int, default=8, help="calibration samples scanned for outlier tokens")
    p.add_argument("--eta", type=float, default=64.0, help="outlier threshold: max|x| > eta * median over the sample's tokens")
    p.add_argument("--seed", type=int, default=0)


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
    g.add_argument("--train-samples", type=int)
    g.add_argument("--train-seqlen", type=int)
    g.add_argument("--epochs", type=int)
    g.add_argument("--train-batch-size", type=int, help="samples per step (sharded over the devices)")
    g.add_argument("--lr-quant", type=float, help="learning rate of scales / zero points (default 5e-5)")
    g.add_argument("--lr-weight", type=float, help="learning rate of the linear weights (default 5e-6)")
    g.add_argument("--no-train-weights", action="store_true", help="train the quantizer parameters only")
    g.add_argument("--train-dir", metavar="DIR", help="checkpoint the run here (after calibration, every block, every --ckpt-every steps)")
    g.add_argument("--ckpt-every", type=int, default=0, help="in-block checkpoint period in steps (0: after each block only)")
    g.add_argument("--resume", metavar="DIR", help="continue the fine-tuning run checkpointed in DIR (implies --train)")


def _add_distributed_args(p):
    g = p.add_argument_group("several processes (jax.distributed; prefixquant_jax/distributed.py)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (or auto: JAX's cluster detection); "
                   "default: JAX_COORDINATOR_ADDRESS, if set")
    g.add_argument("--num-processes", type=int, help="default: JAX_NUM_PROCESSES")
    g.add_argument("--process-id", type=int, help="default: JAX_PROCESS_ID; process 0 alone writes files")


def _add_flat_args(p):
    g = p.add_argument_group("FlatQuant (presets flatquant-*: always trained with the --train flags, then merged)")
    g.add_argument("--flat-lr", type=float, default=5e-3, help="learning rate of the transforms (clip logits: 10x)")
    g.add_argument("--flat-param", choices=("inverse", "orthogonal"), default="inverse",
                   help="inverse: P learned directly, P^-1 = inv(P); orthogonal: P = U diag(s) V^T (Cayley)")
    g.add_argument("--flat-alpha", type=float, default=0.3, help="SmoothQuant-style init of the per-channel scales")


def _site_clips(text: str):
    """'R' or 'R,SITE=R,...' or 'SITE=R,...' -> (R or None, ((SITE, R), ...) or None), for argparse."""
    default, sites = None, []
    for part in text.split(","):
        site, _, r = part.rpartition("=")
        try:
            r = float(r)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a clip ratio: {part.strip()!r} (R or SITE=R)") from None
        if site:
            sites.append((site.strip(), r))
        elif default is None:
            default = r
        else:
            raise argparse.ArgumentTypeError(f"two default clip ratios in {text!r}")
    return default, tuple(sites) or None


# option fields named in library errors (UserError.fields) -> the flags that set them
FLAGS = {
    "QuantizeOptions.calib_samples": "--calib-samples", "QuantizeOptions.calib_seqlen": "--calib-seqlen",
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
    "FlatOptions.lr": "--flat-lr", "FlatOptions.param": "--flat-param", "FlatOptions.alpha": "--flat-alpha",
    # arguments of the evaluation, runtime and checkpoint functions (every subcommand: cli.main)
    "log_path": "--eval-log", "max_windows": "--max-windows", "RuntimeSpec.kernels": "--kernels",
    "backend 'fake'": "--backend fake", "backend 'real'": "--backend real", "pq.save": "`prefixquant quantize --save DIR`",
    "overwrite=True": "--overwrite", "Preset.act_clip": "--dynamic-act-clip",
    "Preset.act_site_clips": "--dynamic-act-clip SITE=R", "Preset.kv_clip": "--dynamic-kv-clip",
}


def flag_error(e: UserError) -> UserError:
    """The library's error with our flag names in place of the option fields it names."""
    msg = str(e)
    for f in sorted(e.fields, key=len, reverse=True):
        msg = msg.replace(f, FLAGS.get(f, f))
    return UserError(msg)


def _flat_options(args):
    from prefixquant_jax.flatquant import FlatOptions
    return FlatOptions(param=args.flat_param, lr=args.flat_lr, alpha=args.flat_alpha)


def _train_cfg(args, preset):
    from prefixquant_jax.train import train_config

    name = "flatquant-paper" if preset.method == "flatquant" and args.train_preset == "paper" else args.train_preset
    return train_config(name, preset.a_bits, samples=args.train_samples, seqlen=args.train_seqlen,
                        epochs=args.epochs, batch_size=args.train_batch_size, lr_quant=args.lr_quant,
                        lr_weight=args.lr_weight, ckpt_every=args.ckpt_every, seed=args.seed,
                        train_weights=False if args.no_train_weights else None)


def _print_train(r: dict) -> None:
    blocks = r["blocks"]
    print(f"fine-tuned {len(blocks)} blocks in {r['seconds']:.0f} s: mean block loss "
          f"{sum(b['loss_before'] for b in blocks) / len(blocks):.3e} -> {sum(b['loss_after'] for b in blocks) / len(blocks):.3e}")


def add_subcommands(sub, add_model_args, add_eval_args) -> None:
    p = sub.add_parser("analyze", help="find the outlier tokens and the prefix; plot activations before/after it")
    add_model_args(p, dtype=False)
    _add_calib_args(p)
    p.add_argument("--no-rotate", action="store_true", help="analyze the unrotated model")
    p.add_argument("--plot", metavar="OUT.png", help="write the outlier plot")

    from prefixquant_jax.quant.presets import PRESETS
    p = sub.add_parser("quantize", help="quantize with a preset, evaluate perplexity, print a table")
    add_model_args(p, dtype=False)
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    _add_calib_args(p)
    p.add_argument("--grid-samples", type=int, default=2, help="calibration samples used inside the clip grid search")
    p.add_argument("--w-bits", type=int)
    p.add_argument("--a-bits", type=int)
    p.add_argument("--kv-bits", type=int)
    p.add_argument("--dynamic-act-clip", type=_site_clips, default=(None, None), metavar="R[,SITE=R...]",
                   help="clip ratio of per-token dynamic activation quantizers (scale from R x amax; preset default); "
                        "SITE=R overrides it at one site (qkv_in, o_in, up_gate_in, down_in), e.g. 0.85,down_in=0.8")
    p.add_argument("--dynamic-kv-clip", type=float, metavar="R", help="the same for dynamic KV quantizers")
    p.add_argument("--prefix-ids", help="comma-separated token ids to use as the prefix instead of detecting them")
    p.add_argument("--gptq", action="store_true", help="GPTQ weights on the RTN scales (calibration inputs' Hessians) instead of RTN")
    p.add_argument("--gptq-damp", type=float, default=0.01, help="GPTQ Hessian dampening, fraction of the mean diagonal")
    p.add_argument("--gptq-order", choices=("act", "natural"), default="act",
                   help="GPTQ input-channel order: 'act' largest Hessian diagonal first (default), 'natural' as stored")
    p.add_argument("--gptq-inputs", choices=("fp", "quantized"), default="fp",
                   help="GPTQ Hessians from the FP block (default) or 'quantized': q|k|v, o, gate|up, down in turn, "
                        "each from the block with the earlier linears' GPTQ weights and the dynamic quantizers on")
    _add_rule_args(p)
    _add_train_args(p)
    _add_flat_args(p)
    _add_distributed_args(p)
    add_eval_args(p, data_flag="--eval-data")
    p.add_argument("--no-fp", action="store_true", help="skip the FP reference evaluation (no fp_ppl / ratio)")
    p.add_argument("--no-eval", action="store_true", help="quantize only")
    p.add_argument("--export-prefix", metavar="FILE.safetensors", help="write the FP prefix KV (layers.{i}.key/value)")
    p.add_argument("--import-prefix", metavar="FILE.safetensors", help="use this prefix KV (export-prefix) instead of computing one")
    p.add_argument("--save", metavar="DIR", help="save the quantized model (Orbax state, metadata, tokenizer) to DIR; "
                   "an existing DIR needs --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --export-prefix file or --train-dir")
    add_export_hf(sub, add_model_args)
    add_export_prefix(sub)


def add_export_hf(sub, add_model_args) -> None:
    p = sub.add_parser("export-hf", help="write the FP model (optionally R1/R2-rotated) as an HF safetensors checkpoint")
    add_model_args(p, dtype=False)
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--rotate", action="store_true", help="fold norms and fuse R1/R2 (R3/R4 are online: not representable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


def cmd_export_hf(args) -> dict:
    from checkpoints_convert import export_hf, load_checkpoint
    from checkpoints_convert.hf import export_rotated_hf

    from prefixquant_jax.checkpoint.saved import looks_saved
    if looks_saved(args.model):  # a `quantize --save` directory: its weights as the quantized forward sees them
        from checkpoints_convert.hf_quantized import export_quantized_hf
        from prefixquant_jax.checkpoint.saved import load_quantized
        if args.rotate:
            raise UserError("--rotate applies to FP checkpoints; a saved quantized model is exported as it was quantized")
        out, online = export_quantized_hf(load_quantized(args.model), args.out, overwrite=args.overwrite)
        print(f"wrote {out}")
        if online:
            print("not representable in a transformers Llama (kept online in prefixquant): " + "; ".join(online))
        return {"model": args.model, "out": out, "quantized": True, "online": online}
    ck = load_checkpoint(args.model)
    if args.rotate:
        out = export_rotated_hf(ck.params, ck.config, args.out, seed=args.seed, overwrite=args.overwrite)
    else:
        out = export_hf(ck.params, ck.config, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")
    return {"model": args.model, "out": out, "rotated": args.rotate, "seed": args.seed}


def add_export_prefix(sub) -> None:
    p = sub.add_parser("export-prefix", help="write the FP prefix KV of a saved quantized model (quantize --save)")
    p.add_argument("--model", required=True, help="a directory written by quantize --save")
    p.add_argument("--out", required=True, metavar="FILE.safetensors")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the results as JSON to OUT")


def cmd_export_prefix(args) -> dict:
    from prefixquant_jax.checkpoint.saved import load_saved_prefix, read_metadata
    from checkpoints_convert.prefix_io import save_prefix_kv

    meta = read_metadata(args.model)
    pkv = load_saved_prefix(args.model, meta)
    if pkv is None:
        raise UserError(f"{args.model}: preset {meta['preset'].get('name')!r} uses no prefix; nothing to export")
    out = save_prefix_kv(pkv, args.out, overwrite=args.overwrite)
    print(f"prefix KV {pkv.prefix_ids} written to {out}")
    return {"model": args.model, "out": out, "prefix_ids": pkv.prefix_ids, "k_rotated": pkv.k_rotated}


def _import_prefix(args, config, preset):
    """The --import-prefix KV, checked against the model (layers, kv heads, head_dim) and the preset's rotation."""
    from checkpoints_convert.prefix_io import load_prefix_kv

    if not preset.prefix:
        raise UserError(f"--import-prefix: preset {preset.name!r} uses no prefix")
    pkv = load_prefix_kv(args.import_prefix, config)
    if pkv.k_rotated != preset.rotate:
        raise UserError(f"{args.import_prefix}: prefix KV computed by a {'rotated' if pkv.k_rotated else 'unrotated'} model; "
                        f"preset {preset.name!r} is {'rotated' if preset.rotate else 'unrotated'}")
    return pkv


def _quantize_options(args, **kw):
    """QuantizeOptions of the calibration and rule flags (`analyze` has only the calibration ones)."""
    from prefixquant_jax.options import QuantizeOptions

    rules = {} if not hasattr(args, "weight_clip") else dict(
        grid_samples=args.grid_samples, gptq=args.gptq, gptq_damp=args.gptq_damp, gptq_act_order=args.gptq_order == "act",
        gptq_inputs=args.gptq_inputs,
        weight_clip=args.weight_clip, kv_rule=args.kv_clip, search=args.clip_search, target=args.clip_target)
    return QuantizeOptions(calib_data=args.calib_data, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                           outlier_samples=args.outlier_samples, eta=args.eta, seed=args.seed, **rules, **kw)


def cmd_analyze(args) -> dict:
    try:
        return _analyze(args)
    except UserError as e:
        raise flag_error(e) from None


def _analyze(args) -> dict:
    import numpy as np

    from prefixquant_jax.eval.data import calibration_samples, load_text, tokenize
    from prefixquant_jax.model import Llama
    from prefixquant_jax.loading import load_fp
    from prefixquant_jax.prefix.outliers import capture_token_ranges, choose_prefix, outlier_ratios, token_absmax
    from prefixquant_jax.prefix.prefix_kv import compute_prefix_kv
    from prefixquant_jax.quant.recipe import QuantRecipe
    from prefixquant_jax.rotate.fuse import RotationConfig, rotate_params

    _quantize_options(args)  # checks the flags
    ck, model = load_fp(args.model)
    tok = ck.tokenizer()
    ids = tokenize(tok, load_text(args.calib_data))
    calib = calibration_samples(ids, args.outlier_samples, args.calib_seqlen, args.seed)
    # outlier tokens are detected on the unrotated model (as `quantize` does)
    plain = capture_token_ranges(model, calib, desc="outliers")
    choice = choose_prefix(calib, outlier_ratios(token_absmax(plain, "down_in")), args.eta, ck.config.bos_token_id)
    if not args.no_rotate:  # ranges before/after the prefix are reported for the model that gets quantized
        params, config = rotate_params(ck.params, ck.config, RotationConfig(seed=args.seed))
        model = Llama.from_params(config, params, recipe=QuantRecipe(r3=True, r4=True))
        before = capture_token_ranges(model, calib, desc="before prefix")
    else:
        before = plain
    prefix = compute_prefix_kv(model, choice["prefix_ids"])
    after = capture_token_ranges(model, calib, prefix_kv=prefix, desc="after prefix")
    res = {"model": args.model, "rotated": not args.no_rotate,
           "unrotated_down_in_max_ratio_per_layer": np.round(outlier_ratios(token_absmax(plain, "down_in"))[:, :, 1:].max(axis=(1, 2)), 2).tolist(), "eta": args.eta, "prefix_ids": choice["prefix_ids"],
           "prefix_text": [tok.decode([t]) for t in choice["prefix_ids"]], "o": choice["o"],
           "outlier_tokens": {tok.decode([t]): c for t, c in choice["outlier_counts"].items()}}
    for site in ("down_in", "qkv_in", "k_cache", "v_cache"):
        b, a = token_absmax(before, site), token_absmax(after, site)
        res[site] = {"max_ratio_per_layer": np.round(outlier_ratios(b)[:, :, 1:].max(axis=(1, 2)), 2).tolist(),
                     "absmax_before": float(b.max()), "absmax_after": float(a.max()),
                     "range_reduction": float(b.max() / max(a.max(), 1e-12))}
    print(f"prefix (eta={args.eta:g}): {res['prefix_text']}  ids {res['prefix_ids']}")
    print("down_proj input max/median per layer (unrotated): " + " ".join(f"{r:.0f}" for r in res["unrotated_down_in_max_ratio_per_layer"]))
    for site in ("down_in", "qkv_in", "k_cache", "v_cache"):
        print(f"  {site:10s} static range {res[site]['absmax_before']:9.2f} -> {res[site]['absmax_after']:9.2f} with the prefix"
              f" ({res[site]['range_reduction']:.1f}x smaller)")
    if args.plot:
        from prefixquant_jax.prefix.plot import plot_outliers
        plot_outliers(args.plot, calib, token_absmax(plain, "down_in"), token_absmax(before, "down_in"),
                      token_absmax(after, "down_in"), tok, res)
        res["plot"] = args.plot
        print(f"plot written to {args.plot}")
    return res


def cmd_quantize(args) -> dict:
    try:
        return _quantize_cmd(args)
    except UserError as e:
        raise flag_error(e) from None


def _quantize_cmd(args) -> dict:
    """Flags -> options -> prefixquant_jax.quantize (the whole job, training included) -> save / evaluate / print."""
    from prefixquant_jax.api import quantize
    from prefixquant_jax.compiled import Compiled
    from prefixquant_jax.eval.data import calibration_samples, load_text, tokenize, windows
    from prefixquant_jax.eval.perplexity import perplexity
    from checkpoints_convert import load_checkpoint
    from prefixquant_jax.model import Llama
    from prefixquant_jax.options import TrainCheckpoint
    from prefixquant_jax.pipeline import needs_calibration
    from prefixquant_jax.quant.presets import get_preset

    from prefixquant_jax.distributed import is_primary, is_several

    primary = is_primary()  # several processes (--coordinator): process 0 alone writes files
    preset = get_preset(args.preset, w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits,
                        act_clip=args.dynamic_act_clip[0], act_site_clips=args.dynamic_act_clip[1],
                        kv_clip=args.dynamic_kv_clip)
    if args.grid != "full":
        if preset.method != "prefixquant":
            raise UserError(f"--grid applies to the PrefixQuant presets, not {preset.name!r}")
        preset = dataclasses.replace(preset, full_grid=False)
    if args.save and primary:  # fail now, not after quantizing
        from prefixquant_jax.checkpoint.saved import check_save_target
        check_save_target(args.save, args.overwrite)
    if args.resume and args.train_dir and args.resume != args.train_dir:
        raise UserError("give either --train-dir or --resume (the directory to continue), not both")
    flat = preset.method == "flatquant"  # FlatQuant always trains (--train implied)
    train_cfg = _train_cfg(args, preset) if (args.train or args.resume or flat) else None
    prefix_ids = None
    if args.prefix_ids:
        try:
            prefix_ids = tuple(int(t) for t in args.prefix_ids.split(","))
        except ValueError:
            raise UserError(f"--prefix-ids must be comma-separated integers, got {args.prefix_ids!r}") from None
    opts = _quantize_options(args, prefix_ids=prefix_ids, flatquant=_flat_options(args) if flat else None)
    checkpoint = None
    if (args.resume or args.train_dir) and is_several():
        raise UserError("--train-dir / --resume with several processes are not supported yet (the training "
                        "checkpoints are not written for several processes); train without them, or in one process")
    if train_cfg is not None and (args.resume or args.train_dir):  # a run named by the model and data flags
        checkpoint = TrainCheckpoint(dir=args.resume or args.train_dir, resume=bool(args.resume), overwrite=args.overwrite,
                                     identity={"model": args.model, "calib_data": args.calib_data})
        checkpoint.check()  # before the slow stages
    t0 = time.time()
    ck = load_checkpoint(args.model)  # the FP reference model is built only for its evaluation, after quantizing
    if args.import_prefix:
        opts = dataclasses.replace(opts, prefix_kv=_import_prefix(args, ck.config, preset))
    P = (len(prefix_ids) if prefix_ids else 9) if preset.prefix else 0  # at most BOS + 8 detected tokens
    if opts.prefix_kv is not None:
        P = opts.prefix_kv.length
    if not args.no_eval and args.seqlen + P > ck.config.max_position_embeddings:
        raise UserError(f"--seqlen {args.seqlen} (+ prefix) exceeds the model's max positions {ck.config.max_position_embeddings}")
    tok = ck.tokenizer()
    calib = train_tokens = None
    if needs_calibration(preset, opts) or train_cfg is not None:  # samples of --calib-data, as the library takes them
        ids = tokenize(tok, load_text(args.calib_data))
        if needs_calibration(preset, opts):
            calib = calibration_samples(ids, args.calib_samples, args.calib_seqlen, args.seed)
        if train_cfg is not None:
            train_tokens = calibration_samples(ids, train_cfg.samples, train_cfg.seqlen, train_cfg.seed)
    qm = quantize(ck, calib, preset, options=opts, train=train_cfg, train_tokens=train_tokens, checkpoint=checkpoint,
                  tokenizer=tok)
    if "train" in qm.report:
        _print_train(qm.report["train"])
    res = {"model": args.model, "preset": preset.name, "prefix_ids": qm.report["prefix_ids"],
           "prefix_tokens": qm.report["prefix_ids"],  # the old name of prefix_ids, for readers of older results
           "prefix_text": qm.report["prefix_text"], "eta": args.eta, "bits": {"w": preset.w_bits, "a": preset.a_bits, "kv": preset.kv_bits},
           "quantize_seconds": time.time() - t0, "report": qm.report}
    if qm.prefix_kv is not None:
        print(f"prefix: {qm.report['prefix_text']} (ids {qm.report['prefix_ids']})")
    if args.export_prefix and qm.prefix_kv is None:
        raise UserError(f"--export-prefix: preset {preset.name!r} uses no prefix")
    if args.export_prefix and primary:
        from checkpoints_convert.prefix_io import save_prefix_kv
        res["prefix_file"] = save_prefix_kv(qm.prefix_kv, args.export_prefix, overwrite=args.overwrite)
        print(f"prefix KV written to {res['prefix_file']}")
    if args.save and primary:
        from prefixquant_jax.checkpoint.saved import save_quantized
        res["saved"] = save_quantized(qm, args.save, overwrite=args.overwrite, tokenizer=tok)
        print(f"quantized model saved to {res['saved']}")
    if not args.no_eval and primary:  # the others would compute the same numbers
        win = windows(tokenize(tok, load_text(args.eval_data)), args.seqlen, args.max_windows)
        t = time.time()
        r = perplexity(qm.compiled(), win, batch_size=args.batch_size, desc=preset.name,  # behind its prefix
                       log_path=args.eval_log)
        res.update(ppl=r["ppl"], windows=r["windows"], seqlen=r["seqlen"], tokens=r["tokens"], eval_seconds=time.time() - t)
        rows = [(preset.name, r["ppl"], res["quantize_seconds"] + res["eval_seconds"])]
        if not args.no_fp and preset.name != "fp":
            t = time.time()
            fp_model = Llama.from_params(ck.config, ck.params)  # not held during the pipeline: one model less
            f = perplexity(Compiled(fp_model), win, None, batch_size=args.batch_size, desc="fp")
            del fp_model
            res["fp_ppl"] = f["ppl"]
            rows.insert(0, ("fp", f["ppl"], time.time() - t))
        fp_ppl = res.get("fp_ppl", res["ppl"] if preset.name == "fp" else None)
        print(f"\n{'preset':26s} {'ppl':>10s} {'x FP':>7s} {'seconds':>9s}   ({r['windows']} windows x {r['seqlen']} of {args.eval_data})")
        for name, ppl, sec in rows:
            ratio = f"{ppl / fp_ppl:7.3f}" if fp_ppl else "      -"
            print(f"{name:26s} {ppl:10.4f} {ratio} {sec:9.1f}")
    res["seconds"] = time.time() - t0
    return res


HANDLERS = {"analyze": cmd_analyze, "quantize": cmd_quantize, "export-hf": cmd_export_hf, "export-prefix": cmd_export_prefix}
