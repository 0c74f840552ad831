"""Subcommands `analyze` (outlier tokens, prefix choice, plot), `quantize` (run a preset, evaluate), `export-hf` and
`export-prefix`; their flags and the options built from them: cli/flags.py."""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import numpy as np

from prefixquant_jax.checkpoint.export import export_hf, export_quantized_hf, export_rotated_hf
from prefixquant_jax.checkpoint.fp import load_checkpoint, load_prefix_kv, save_prefix_kv
from prefixquant_jax.checkpoint.saved import (check_save_target, load_quantized, load_saved_prefix, looks_saved,
                                              read_metadata, save_quantized)
from prefixquant_jax.cli.args import EXISTING_DIR, NEW_DIR, NEW_FILE, add_json_arg, add_model_args, number
from prefixquant_jax.cli.flags import (add_analyze_parser, add_quantize_parser, flag_error, flat_options,
                                       quantize_options, train_cfg)
from prefixquant_jax.errors import UserError
from prefixquant_jax.eval.data import calibration_samples, load_text, tokenize, windows
from prefixquant_jax.eval.perplexity import perplexity
from prefixquant_jax.nn.decoder import Decoder, with_prefix
from prefixquant_jax.options import TrainCheckpoint
from prefixquant_jax.parallel.distributed import is_primary, is_several
from prefixquant_jax.parallel.sharding import MeshSpec, shard
from prefixquant_jax.pipeline.stages import needs_calibration, quantize
from prefixquant_jax.prefix.outliers import capture_token_ranges, find_prefix, outlier_ratios, token_absmax
from prefixquant_jax.prefix.plot import plot_outliers
from prefixquant_jax.prefix.prefix_kv import compute_prefix_kv
from prefixquant_jax.presets import preset
from prefixquant_jax.quant.recipe import QuantRecipe
from prefixquant_jax.rotate.fuse import RotationConfig, rotate_params


def _flag_names(cmd):
    """cmd with the library's UserErrors re-raised under our flag names (flag_error)."""
    @functools.wraps(cmd)
    def run(args) -> dict:
        try:
            return cmd(args)
        except UserError as e:
            raise flag_error(e) from None
    return run


def _print_train(r: dict) -> None:
    blocks = r["blocks"]
    print(f"fine-tuned {len(blocks)} blocks in {r['seconds']:.0f} s: mean block loss "
          f"{sum(b['loss_before'] for b in blocks) / len(blocks):.3e} -> {sum(b['loss_after'] for b in blocks) / len(blocks):.3e}")


def add_subcommands(sub) -> None:
    add_analyze_parser(sub)
    add_quantize_parser(sub)
    p = sub.add_parser("export-hf", help="write the FP model (optionally R1/R2-rotated) or a saved quantized model's "
                       "weights as an HF safetensors checkpoint")
    add_model_args(p, dtype=False)
    p.add_argument("--out", required=True, type=NEW_DIR, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--rotate", action="store_true", help="fold norms and fuse R1/R2 (R3/R4 are online: not representable)")
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("export-prefix", help="write the FP prefix KV of a saved quantized model (quantize --save)")
    p.add_argument("--model", required=True, type=EXISTING_DIR, help="a directory written by quantize --save")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", type=NEW_FILE)
    p.add_argument("--overwrite", action="store_true")
    add_json_arg(p)


def cmd_export_hf(args) -> dict:
    if looks_saved(args.model):  # a `quantize --save` directory: its weights as the quantized forward sees them
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


def cmd_export_prefix(args) -> dict:
    meta = read_metadata(args.model)
    pkv = load_saved_prefix(args.model, meta)
    if pkv is None:
        raise UserError(f"{args.model}: recipe {meta['summary']['name']!r} uses no prefix; nothing to export")
    out = save_prefix_kv(pkv, args.out, overwrite=args.overwrite)
    print(f"prefix KV {list(pkv.prefix_ids)} written to {out}")
    return {"model": args.model, "out": out, "prefix_ids": list(pkv.prefix_ids), "k_rotated": pkv.k_rotated}


def _import_prefix(path: str, config, recipe):
    """The --import-prefix KV, checked against the model (layers, kv heads, head_dim) and the recipe's rotation."""
    if not recipe.prefix:
        raise UserError(f"--import-prefix: {recipe.name!r} uses no prefix")
    pkv = load_prefix_kv(path, config)
    if pkv.k_rotated != recipe.rotate:
        raise UserError(f"{path}: prefix KV computed by a {'rotated' if pkv.k_rotated else 'unrotated'} model; "
                        f"{recipe.name!r} is {'rotated' if recipe.rotate else 'unrotated'}")
    return pkv


@_flag_names
def cmd_analyze(args) -> dict:
    opts = quantize_options(args)  # checks the flags
    ck = load_checkpoint(args.model)
    tok = ck.tokenizer()
    calib = calibration_samples(tokenize(tok, load_text(args.calib_data)), args.outlier_samples, args.calib_seqlen,
                                args.seed)
    model = Decoder(ck.config, ck.params)
    choice, plain = find_prefix(model, calib, opts.eta)  # on the unrotated model, as quantize does
    if not args.no_rotate:  # ranges before/after the prefix are reported for the model that gets quantized
        params, config = rotate_params(ck.params, ck.config, RotationConfig(seed=args.seed))
        model = Decoder(config, params, recipe=QuantRecipe(rotate=True))
        before = capture_token_ranges(model, calib, desc="before prefix")
    else:
        before = plain
    prefix = compute_prefix_kv(model, choice["prefix_ids"], k_rotated=not args.no_rotate)
    after = capture_token_ranges(with_prefix(model, prefix), calib, desc="after prefix")
    res = {"model": args.model, "rotated": not args.no_rotate,
           "unrotated_down_in_max_ratio_per_layer": np.round(outlier_ratios(token_absmax(plain, "down_in"))[:, :, 1:].max(axis=(1, 2)), 2).tolist(),
           "eta": args.eta, "prefix_ids": choice["prefix_ids"],
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
        plot_outliers(args.plot, calib, token_absmax(plain, "down_in"), token_absmax(before, "down_in"),
                      token_absmax(after, "down_in"), tok, res)
        res["plot"] = args.plot
        print(f"plot written to {args.plot}")
    return res


def _mesh(args, several: bool):
    """--mesh as a MeshSpec, its device count checked now (before loading); None without the flag: the library's
    default (calibration on one device, training's batches over every process's devices)."""
    if not args.mesh:
        return None
    if several:
        raise UserError("--mesh with several processes is not supported yet (a mesh spans one process's devices); "
                        "leave it out: training's batches then go over every process's devices on data")
    spec = MeshSpec.parse(args.mesh)
    spec.make()
    return spec


def _recipe(args):
    """The --preset with the flags that override it."""
    if args.grid != "full" and args.preset.startswith("flatquant"):
        raise UserError(f"--grid applies to the PrefixQuant presets, not {args.preset!r}")
    return preset(args.preset, w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits,
                  act_clip=args.dynamic_act_clip[0], act_site_clips=args.dynamic_act_clip[1],
                  kv_clip=args.dynamic_kv_clip, full_grid=False if args.grid != "full" else None)


@_flag_names
def cmd_quantize(args) -> dict:
    """Flags -> options -> the pipeline (training included) -> save / evaluate / print."""
    primary = is_primary()  # several processes (--coordinator): process 0 alone writes files
    recipe = _recipe(args)
    if args.save and primary:  # fail now, not after quantizing
        check_save_target(args.save, args.overwrite)
    if args.resume and args.train_dir and args.resume != args.train_dir:
        raise UserError("give either --train-dir or --resume (the directory to continue), not both")
    flat = recipe.method == "flatquant"  # FlatQuant always trains (--train implied)
    train = train_cfg(args, recipe) if (args.train or args.resume or flat) else None
    prefix_ids = None
    if args.prefix_ids:
        try:
            prefix_ids = tuple(int(t) for t in args.prefix_ids.split(","))
        except ValueError:
            raise UserError(f"--prefix-ids must be comma-separated integers, got {args.prefix_ids!r}") from None
    opts = quantize_options(args, prefix_ids=prefix_ids, flatquant=flat_options(args) if flat else None)
    checkpoint = None
    if (args.resume or args.train_dir) and is_several():
        raise UserError("--train-dir / --resume with several processes are not supported yet (the training "
                        "checkpoints are not written for several processes); train without them, or in one process")
    if train is not None and (args.resume or args.train_dir):  # a run named by the model and data flags
        checkpoint = TrainCheckpoint(dir=args.resume or args.train_dir, resume=bool(args.resume), overwrite=args.overwrite,
                                     identity={"model": args.model, "calib_data": args.calib_data})
        checkpoint.check()  # before the slow stages
    mesh = _mesh(args, is_several())
    t0 = time.time()
    ck = load_checkpoint(args.model)  # the FP reference model is built only for its evaluation, after quantizing
    if args.import_prefix:
        opts = dataclasses.replace(opts, prefix_kv=_import_prefix(args.import_prefix, ck.config, recipe))
    P = (len(prefix_ids) if prefix_ids else 9) if recipe.prefix else 0  # at most BOS + 8 detected tokens
    if opts.prefix_kv is not None:
        P = opts.prefix_kv.length
    if not args.no_eval and args.seqlen + P > ck.config.max_position_embeddings:
        raise UserError(f"--seqlen {args.seqlen} (+ prefix) exceeds the model's max positions {ck.config.max_position_embeddings}")
    tok = ck.tokenizer()
    calib = train_tokens = None
    if needs_calibration(recipe, opts) or train is not None:  # samples of --calib-data, as the library takes them
        ids = tokenize(tok, load_text(args.calib_data))
        if needs_calibration(recipe, opts):
            calib = calibration_samples(ids, args.calib_samples, args.calib_seqlen, args.seed)
        if train is not None:
            train_tokens = calibration_samples(ids, train.samples, train.seqlen, train.seed)
    qm = quantize(ck, calib, recipe, opts, train=train, train_tokens=train_tokens, checkpoint=checkpoint, mesh=mesh)
    pkv = qm.prefix_kv
    prefix_text = [] if pkv is None else [tok.decode([t]) for t in pkv.prefix_ids]
    if pkv is not None and not pkv.text:  # the library takes tokens only: the text is the CLI's to add
        qm = qm.replace(model=with_prefix(qm.model, dataclasses.replace(pkv, text=tok.decode(list(pkv.prefix_ids)))))
    if "train" in qm.report:
        _print_train(qm.report["train"])
    res = {"model": args.model, "recipe": recipe.name, "prefix_ids": qm.report["prefix_ids"], "prefix_text": prefix_text,
           "eta": args.eta, "bits": {"w": recipe.w_bits, "a": recipe.a_bits, "kv": recipe.kv_bits},
           "quantize_seconds": time.time() - t0, "report": qm.report,
           "mesh": None if mesh is None else dict(zip(("data", "model"), mesh.resolve(len(jax.local_devices()))))}
    if pkv is not None:
        print(f"prefix: {prefix_text} (ids {qm.report['prefix_ids']})")
    if args.export_prefix and pkv is None:
        raise UserError(f"--export-prefix: {recipe.name!r} uses no prefix")
    if args.export_prefix and primary:
        res["prefix_file"] = save_prefix_kv(qm.prefix_kv, args.export_prefix, overwrite=args.overwrite)
        print(f"prefix KV written to {res['prefix_file']}")
    if args.save and primary:
        res["saved"] = save_quantized(qm, args.save, overwrite=args.overwrite, tokenizer=tok)
        print(f"quantized model saved to {res['saved']}")
    if not args.no_eval and primary:  # the others would compute the same numbers
        win = windows(tokenize(tok, load_text(args.eval_data)), args.seqlen, args.max_windows)
        t = time.time()
        placed = shard(qm.model, mesh)
        r = perplexity(placed.model, win, batch_size=args.batch_size, desc=recipe.name, log_path=args.eval_log,
                       mesh=placed.mesh)
        res.update(ppl=r["ppl"], windows=r["windows"], seqlen=r["seqlen"], tokens=r["tokens"], eval_seconds=time.time() - t)
        rows = [(recipe.name, r["ppl"], res["quantize_seconds"] + res["eval_seconds"])]
        if not args.no_fp and recipe.name != "fp":
            t = time.time()
            placed = shard(Decoder(ck.config, ck.params), mesh)  # not held during the pipeline: one model less
            f = perplexity(placed.model, win, batch_size=args.batch_size, desc="fp", mesh=placed.mesh)
            del placed
            res["fp_ppl"] = f["ppl"]
            rows.insert(0, ("fp", f["ppl"], time.time() - t))
        fp_ppl = res.get("fp_ppl", res["ppl"] if recipe.name == "fp" else None)
        print(f"\n{'recipe':26s} {'ppl':>10s} {'x FP':>7s} {'seconds':>9s}   ({r['windows']} windows x {r['seqlen']} of {args.eval_data})")
        for name, ppl, sec in rows:
            ratio = f"{ppl / fp_ppl:7.3f}" if fp_ppl else "      -"
            print(f"{name:26s} {ppl:10.4f} {ratio} {sec:9.1f}")
    res["seconds"] = time.time() - t0
    return res


HANDLERS = {"analyze": cmd_analyze, "quantize": cmd_quantize, "export-hf": cmd_export_hf,
            "export-prefix": cmd_export_prefix}
