"""Subcommands `analyze` (outlier tokens, prefix choice, plot), `quantize` (run a preset, evaluate), `export-hf` and
`export-prefix`; the flags of analyze / quantize and the options built from them: cli_quant_flags.py."""
from __future__ import annotations

import dataclasses
import functools
import time

from prefixquant_jax.cli_quant_flags import (FLAGS, _flat_options, _quantize_options, _site_clips,  # noqa: F401
                                             _train_cfg, add_analyze_parser, add_quantize_parser, flag_error)
from prefixquant_jax.errors import UserError


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


def add_subcommands(sub, add_model_args, add_eval_args, add_mesh_arg) -> None:
    add_analyze_parser(sub, add_model_args)
    add_quantize_parser(sub, add_model_args, add_eval_args, add_mesh_arg)
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


@_flag_names
def cmd_analyze(args) -> dict:
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


def _mesh(args, several: bool):
    """--mesh as a sharding.MeshSpec, its device count checked now (before loading); None without the flag: the
    library's default (calibration on one device, training's batches over every process's devices)."""
    from prefixquant_jax.sharding import MeshSpec

    if not args.mesh:
        return None
    if several:
        raise UserError("--mesh with several processes is not supported yet (a mesh spans one process's devices); "
                        "leave it out: training's batches then go over every process's devices on data")
    spec = MeshSpec.parse(args.mesh)
    spec.make()
    return spec


@_flag_names
def cmd_quantize(args) -> dict:
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

    import jax

    from prefixquant_jax.distributed import is_primary, is_several
    from prefixquant_jax.sharding import shard

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
    mesh = _mesh(args, is_several())
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
                  tokenizer=tok, mesh=mesh)
    if "train" in qm.report:
        _print_train(qm.report["train"])
    res = {"model": args.model, "preset": preset.name, "prefix_ids": qm.report["prefix_ids"],
           "prefix_tokens": qm.report["prefix_ids"],  # the old name of prefix_ids, for readers of older results
           "prefix_text": qm.report["prefix_text"], "eta": args.eta, "bits": {"w": preset.w_bits, "a": preset.a_bits, "kv": preset.kv_bits},
           "quantize_seconds": time.time() - t0, "report": qm.report,
           "mesh": None if mesh is None else dict(zip(("data", "model"), mesh.resolve(len(jax.local_devices()))))}
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
        r = perplexity(shard(qm.compiled(), mesh) if mesh else qm.compiled(), win, batch_size=args.batch_size, desc=preset.name,  # behind its prefix
                       log_path=args.eval_log)
        res.update(ppl=r["ppl"], windows=r["windows"], seqlen=r["seqlen"], tokens=r["tokens"], eval_seconds=time.time() - t)
        rows = [(preset.name, r["ppl"], res["quantize_seconds"] + res["eval_seconds"])]
        if not args.no_fp and preset.name != "fp":
            t = time.time()
            fp_model = Llama.from_params(ck.config, ck.params)  # not held during the pipeline: one model less
            f = perplexity(shard(Compiled(fp_model), mesh) if mesh else Compiled(fp_model), win, None, batch_size=args.batch_size, desc="fp")
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
