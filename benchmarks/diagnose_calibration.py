"""Stage-by-stage calibration errors of the PrefixQuant initialisation rules, ours vs the reference's (issue [G]).

Every variant quantizes the same model (optionally its first --layers blocks only) on the same calibration
samples and reports, per layer, what each stage's rule minimises and what it leaves behind:

  weights   sum over linears of ||X W - X Q(W)||^2 per token on the block's calibration inputs X,
            for the data-free clip ("mse" rule) and, where computed, the output-aware clip and GPTQ;
  kv        the block loss right after the KV/act scales are set at their starting ratios, and after the search;
  block     out_mse: mean (x_q - x_fp)^2 after the block, over all calibration samples (x_q: the quantized
            model's hidden state, x_fp: the FP model's): the error every later block inherits.

With --valid-windows K, each variant's model is also scored on the first K windows of the WikiText-2
*validation* split (not the test windows; the calibration samples are drawn from that split too).

Usage: python benchmarks/diagnose_calibration.py [--preset w4a4kv4-static] [--layers 30]
          [--variants old,grid,grid+wout,...] [--valid-windows 4] [--json OUT]
A variant is '+'-joined rule changes applied in order to the old defaults:
  old    our rules before issue [G]: amax/7 grid, data-free weight clip, one KV ratio per site, greedy search
  grid   symmetric quantizers on the full 2^b - 1 step grid (2 amax / 15 at 4 bits)
  wout   output-aware weight clip;   kvhead  per-head K (attention) / V clip
  alone  each activation site searched alone;   local  search target = FP block on the quantized inputs
  gptq   GPTQ codes on the weight scales;   actorder  GPTQ in decreasing Hessian-diagonal order
  gptqseq  GPTQ Hessians sequential in the block, from the quantized path (dynamic quantizers on)
  aclipNN  per-token dynamic activations clipped at 0.NN x amax (dynamic presets); kvclipNN  the same for dynamic KV
  aclipNN@SITE  that ratio at one activation site only (qkv_in, o_in, up_gate_in, down_in), after any aclipNN
  dampNNN  GPTQ Hessian dampening 0.NNN x its mean diagonal (damp010 = 0.01, the default)
  ref    = grid+wout+kvhead+alone+local (the reference's rules)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import numpy as np

import prefixquant_jax as pq
from prefixquant_jax.presets import preset as get_recipe

STEPS = {
    "grid": ({"full_grid": True}, {}),
    "wout": ({}, {"weight_clip": "output"}),
    "kvhead": ({}, {"kv_rule": "head"}),
    "alone": ({}, {"search": "alone"}),
    "local": ({}, {"target": "local"}),
    "gptq": ({}, {"gptq": True}),
    "actorder": ({}, {"gptq_act_order": True}),
    "gptqseq": ({}, {"gptq_inputs": "quantized"}),
}
OLD = ({"full_grid": False}, {"weight_clip": "mse", "kv_rule": "site", "search": "greedy", "target": "fp", "gptq": False,
                              "gptq_act_order": False})


def step(p: str):
    """The (recipe, options) changes of one variant step; "aclipNN": dynamic activation clip ratio 0.NN;
    "aclipNN@SITE": that ratio at one site (added to the variant's act_site_clips by `variant`)."""
    if p.startswith("aclip") and "@" in p:
        ratio, site = p[len("aclip"):].split("@", 1)
        if ratio.isdigit():
            return {"act_site_clips": ((site, int(ratio) / 100),)}, {}
    if p.startswith("damp") and p[len("damp"):].isdigit():
        return {}, {"gptq_damp": int(p[len("damp"):]) / 1000}
    for prefix, field in (("aclip", "act_clip"), ("kvclip", "kv_clip")):
        if p.startswith(prefix) and p[len(prefix):].isdigit():
            return {field: int(p[len(prefix):]) / 100}, {}
    if p not in STEPS:
        raise SystemExit(f"error: unknown variant step {p!r} (known: {', '.join(STEPS)}, aclipNN, kvclipNN, dampNNN, ref)")
    return STEPS[p]


def variant(name: str):
    preset_kw, opt_kw = dict(OLD[0]), dict(OLD[1])
    parts = name.split("+")
    if parts[0] == "ref":
        parts = ["old", "grid", "wout", "kvhead", "alone", "local"] + parts[1:]
    if parts[0] != "old":
        parts = ["old"] + parts
    for p in parts[1:]:
        pkw, okw = step(p)
        if "act_site_clips" in pkw:  # per-site ratios accumulate
            pkw = {"act_site_clips": preset_kw.get("act_site_clips", ()) + pkw["act_site_clips"]}
        preset_kw.update(pkw)
        opt_kw.update(okw)
    return preset_kw, opt_kw


def truncated(ck, layers: int | None):
    if not layers or layers >= ck.config.num_layers:
        return ck
    params = dict(ck.params)
    params["layers"] = {i: ck.params["layers"][i] for i in range(layers)}
    return dataclasses.replace(ck, config=dataclasses.replace(ck.config, num_layers=layers), params=params)


def summarize(report: dict) -> dict:
    rows = report.get("calibration", [])
    w = {}
    for rule in ("mse", "output", "gptq"):
        vals = [sum(e[rule] for e in r["weights"].values()) for r in rows if "weights" in r
                and all(rule in e for e in r["weights"].values())]
        if vals:
            w[rule] = vals
    return {"out_mse": [r["out_mse"] for r in rows], "weight_err": w,
            "grid_loss_init": [r.get("grid_loss_init") for r in rows], "grid_loss": [r.get("grid_loss") for r in rows],
            "ratios": [r.get("ratios") for r in rows]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--preset", default="w4a4kv4-static")
    ap.add_argument("--layers", type=int, default=None, help="quantize only the first N blocks (default: all)")
    ap.add_argument("--variants", default="old,grid,grid+wout,grid+wout+kvhead,ref")
    ap.add_argument("--calib-data", default="wikitext2-valid")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--grid-samples", type=int, default=2)
    ap.add_argument("--valid-windows", type=int, default=0, help="also score the first K validation windows")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args(argv)

    from prefixquant_jax.errors import UserError
    from prefixquant_jax.eval.data import calibration_samples, load_text, tokenize

    try:
        ck = truncated(pq.load_checkpoint(args.model), args.layers)
        tok = ck.tokenizer()
        # the samples `prefixquant quantize` draws (its --seed 0): the same for every variant
        calib = calibration_samples(tokenize(tok, load_text(args.calib_data)), args.calib_samples, args.calib_seqlen, 0)
        variants = [(v, *variant(v)) for v in args.variants.split(",")]
        results = {}
        for name, pkw, okw in variants:
            t = time.time()
            recipe = get_recipe(args.preset, **pkw)
            qm = pq.quantize(ck, calib, recipe, grid_samples=args.grid_samples, progress=False, **okw)
            res = summarize(qm.report)
            res["seconds"] = time.time() - t
            if args.valid_windows:
                res["valid_ppl"] = valid_ppl(qm, tok, args.valid_windows, args.seqlen)
            results[name] = res
            last = res["out_mse"][-1] if res["out_mse"] else float("nan")
            w = {k: f"{sum(v):.4g}" for k, v in res["weight_err"].items()}
            print(f"{name:32s} final out_mse {last:.4g}  mean out_mse {np.mean(res['out_mse']):.4g}  weight err {w}"
                  + (f"  valid ppl {res['valid_ppl']:.3f}" if "valid_ppl" in res else "") + f"  ({res['seconds']:.0f} s)",
                  flush=True)
    except UserError as e:
        raise SystemExit(f"error: {e}")
    print_layers(results)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


def print_layers(results: dict) -> None:
    names = list(results)
    n = max(len(r["out_mse"]) for r in results.values())
    print("\nblock-output MSE per layer (x_q vs x_fp, all calibration samples)")
    print("layer " + " ".join(f"{v[:14]:>14s}" for v in names))
    for i in range(n):
        print(f"{i:5d} " + " ".join(f"{results[v]['out_mse'][i]:14.4g}" if i < len(results[v]["out_mse"]) else " " * 14
                                   for v in names))


def valid_ppl(qm, tok, k: int, seqlen: int) -> float:
    from prefixquant_jax.eval.data import load_text, tokenize, windows

    win = windows(tokenize(tok, load_text("wikitext2-valid")), seqlen, k)
    r = pq.perplexity(qm, win)
    return r["ppl"] if math.isfinite(r["ppl"]) else float("nan")


if __name__ == "__main__":
    main()
