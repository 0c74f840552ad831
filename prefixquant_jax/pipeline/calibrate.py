"""Block-by-block initialisation of every quantizer from calibration data: weights, then static scales.

For block l, x_q are the inputs after the already-quantized blocks 0..l-1 and x_fp the FP model's
inputs, both behind the FP prefix KV. In each block, in order:

1. weights (`weight_clip`, QuantizeOptions.weight_clip): per-output-channel scales, either data-free ("mse": the clip
   ratio minimising ||W - Q(W)||^2) or output-aware ("output": the ratio minimising ||X W - X Q(W)||^2
   on the block's FP-activation inputs X from x_q, via their Gram matrix; quant/clip_search.py); then,
   with `gptq`, GPTQ codes on those scales from the same Gram matrices (quant/gptq.py).
2. KV (`kv_rule`, static per-head specs): "head" picks one clip ratio per KV head, K by the error of
   the attention probabilities it gives, V by its reconstruction error; "site" leaves them to step 3.
3. static activation sites (and KV under "site"): scales from the site's full range over the
   calibration tokens (prefix tokens are never among them), then clip ratios searched over a coarse
   grid and a fine grid around its optimum for the lowest block-output MSE. `search` "greedy": one site
   at a time in order with the others (and the quantized weights) on; "alone": each site with every
   other quantizer of the block off, then all on. `target` "fp": the FP block on x_fp; "local": the FP
   block on x_q (the error this block adds).
The rules (gptq*, kv_rule, search, target, grid_samples) are QuantizeOptions' fields, one set of defaults.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from prefixquant_jax.errors import UserError
from prefixquant_jax.options import QuantizeOptions
from prefixquant_jax.nn.decoder import WEIGHT_NAMES, with_recipe
from prefixquant_jax.pipeline.blocks import BlockRunner
from prefixquant_jax.quant.clip_search import head_clip_attention, head_clip_reconstruction, output_aware_weight_clip
from prefixquant_jax.quant.gptq import (LINEAR_INPUT, gptq_with_factor, inverse_hessian_factor, output_error,
                                         round_to_grid)
from prefixquant_jax.quant.ops import minmax, mse_clip_search, qparams_from_range
from prefixquant_jax.quant.recipe import QUANT_SITES

COARSE = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
FINE_STEPS = (-0.05, 0.05)
CLIP_GRID = tuple(float(r) for r in np.round(np.linspace(1.0, 0.5, 21), 3))  # 1.0, 0.975, ..., 0.5
CHUNK = 8  # samples per block forward


def static_sites(recipe) -> list[str]:
    return [s for s in QUANT_SITES if recipe.spec(s) is not None and not recipe.spec(s).dynamic]


def _site_range(lo, hi, spec):
    """Reduce per-token ranges to the spec's static granularity: per tensor -> [1,1,1]; per head -> [KV,1]."""
    if spec.granularity == "head":  # lo, hi: [N, L, KV]
        return lo.min(axis=(0, 1))[:, None], hi.max(axis=(0, 1))[:, None]
    return np.full((1, 1, 1), lo.min()), np.full((1, 1, 1), hi.max())


def init_qparams(block, recipe, ranges: dict) -> None:
    """Create the block's static quantizers' Scale (and ZeroPoint) from full ranges (clip ratio 1)."""
    for site in static_sites(recipe):
        spec = recipe.spec(site)
        lo, hi = ranges[site]
        scale, zero = qparams_from_range(jnp.asarray(lo), jnp.asarray(hi), spec, 1.0)
        block.set_quantizer(site, scale, None if spec.symmetric else zero)


def _grams(runner: BlockRunner, qb, layer: int, recipe, x_q: np.ndarray, opts: QuantizeOptions) -> dict:
    """{site: Gram} of the block's linear inputs on x_q: FP activations and weights as they are (opts.gptq_inputs
    "fp"), or with the dynamic quantizers on ("quantized"; static ones are not calibrated yet)."""
    sites = () if opts.gptq_inputs == "fp" else tuple((s, sp) for s, sp in recipe.sites if sp.dynamic)
    grams = runner.grams(with_recipe(qb, recipe.replace(sites=sites, weight=None)), x_q, CHUNK)
    for site, g in grams.items():
        if not np.all(np.isfinite(g)):
            raise UserError(f"non-finite activations at layer {layer} {site}")
    return grams


def init_block_weights(runner: BlockRunner, qb, layer: int, recipe, x_q: np.ndarray, opts: QuantizeOptions,
                       weight_clip: str) -> dict:
    """Step 1 (module docstring) for one block, in place: qparams[<name>] and, with GPTQ, the kernels.
    Returns {linear: {"mse": err, "output": err, "gptq": err}} output errors per token (those that apply)."""
    spec, grams, tokens = recipe.weight, None, x_q.shape[0] * x_q.shape[1]
    data_aware = weight_clip == "output" or opts.gptq
    ratios = np.asarray(CLIP_GRID, np.float32)
    factors, errs = {}, {}
    for name in WEIGHT_NAMES:  # forward order: a linear's input site comes after the earlier linears' outputs
        site = LINEAR_INPUT[name]
        if data_aware and (grams is None or (opts.gptq_inputs == "quantized" and site not in factors)):
            grams = _grams(runner, qb, layer, recipe, x_q, opts)  # once, or once per new input site
        mod = qb.linear_module(name)
        w = mod.kernel[...]
        ratio = _mse_ratio(w, spec, ratios)
        e = {}
        if grams is not None:
            g = grams[site]
            best, per_ratio = output_aware_weight_clip(w, g, spec, ratios)  # per_ratio [R, out]
            pick = lambda r: float(np.take_along_axis(np.asarray(per_ratio), _grid_index(ratios, r), 0).sum() / tokens)
            e["mse"] = pick(ratio)
            if weight_clip == "output":
                ratio = best
                e["output"] = pick(ratio)
        scale = qparams_from_range(*minmax(w, spec), spec, ratio)[0]
        if opts.gptq:
            wn = np.asarray(w, np.float32)
            if site not in factors:  # once per shared input
                factors[site] = inverse_hessian_factor(grams[site], opts.gptq_damp, opts.gptq_act_order)
            new = gptq_with_factor(wn, factors[site], np.asarray(scale, np.float32), spec)
            e["gptq"] = output_error(wn, new, grams[site]) / tokens
            mod.kernel[...] = jnp.asarray(new, w.dtype)
        qb.set_quantizer(name, jnp.asarray(scale, jnp.float32))
        errs[name] = e
    return errs


_mse_ratio = jax.jit(mse_clip_search, static_argnums=1)


def _grid_index(ratios, r) -> np.ndarray:
    """Index into `ratios` of each chosen ratio r [1, out] (r is one of them)."""
    return np.abs(np.asarray(r, np.float32).reshape(1, -1) - ratios[:, None]).argmin(axis=0)[None, :]


def _set_site(qb, site, spec, lo, hi, ratio):
    scale, zero = qparams_from_range(jnp.asarray(lo), jnp.asarray(hi), spec, jnp.asarray(ratio, jnp.float32))
    qb.qparams[site]["scale"][...] = scale
    if not spec.symmetric:
        qb.qparams[site]["zero"][...] = zero


def _kv_by_head(runner, qb, recipe, x_g, ranges) -> dict:
    """Step 2: per-head clip ratios of the static per-head KV sites; returns {site: ratios [KV, 1]}."""
    caps = runner.qkv(qb, x_g, CHUNK)
    out = {}
    for site in ("k_cache", "v_cache"):
        spec = recipe.spec(site)
        if spec is None or spec.dynamic or spec.granularity != "head":
            continue
        lo, hi = ranges[site]
        if site == "k_cache":
            prefix_k = None if qb.prefix_k is None else qb.prefix_k[...]  # the FP prefix keys stay FP
            r, _ = head_clip_attention(caps["q_attn"], caps["k_cache_x"], spec, CLIP_GRID, prefix_k, lo, hi)
        else:
            r, _ = head_clip_reconstruction(caps["v_cache_x"], spec, CLIP_GRID, lo, hi)
        out[site] = np.asarray(r)
    return out


def _search_sites(runner, qb, recipe, sites, ranges, ratios, xg, tg, search: str) -> None:
    """Step 3: coarse-then-fine clip search of `sites` (ratios updated in place)."""
    def loss_with(r: dict, run) -> float:
        for s in sites:  # in qb's variables, which `run` shares
            _set_site(qb, s, recipe.spec(s), *ranges[s], r[s])
        return runner.loss(run, xg, tg)

    for s in sites:
        run = qb
        if search == "alone":  # this site's quantizer only: weights FP, every other site off
            run = with_recipe(qb, recipe.replace(sites=((s, recipe.spec(s)),), weight=None))
        best_r, best = ratios[s], None
        for grid in (COARSE, None):
            cands = grid if grid is not None else [round(best_r + d, 4) for d in FINE_STEPS
                                                  if 0.05 <= best_r + d <= 1.0]
            for r in cands:
                ratios[s] = r
                val = loss_with(ratios, run)
                if best is None or val < best:
                    best, best_r = val, r
        ratios[s] = best_r
    for s in sites:
        _set_site(qb, s, recipe.spec(s), *ranges[s], ratios[s])


def calibrate(fp_blocks, q_model, calib_x: np.ndarray, opts: QuantizeOptions, *, weight_clip: str | None,
              static: bool, progress: bool = True, mesh=None) -> list[dict]:
    """Initialise q_model's quantizers block by block, in place (module docstring); per-layer reports.

    calib_x: embedded calibration tokens [N, L, D] (float32), behind q_model's own FP prefix. fp_blocks: anything
    whose `[l]` is FP block l (pipeline.fp_blocks.FPBlocks over q block l's arrays): it is read once per layer,
    before q block l is touched, and that block alone is held while layer l is calibrated. `weight_clip`: the
    weights' rule ("mse" or "output"; None: weights as they are); `static`: calibrate the static sites (False: a
    resumed training run restores their scales). `mesh`: a (data, model) jax.sharding.Mesh the block forwards run
    on (pipeline.blocks.BlockRunner; the searches and GPTQ work on the host-gathered statistics)."""
    recipe = q_model.recipe
    if opts.gptq and weight_clip is None:
        raise ValueError("GPTQ needs weight scales: a weight_clip rule")
    sites = static_sites(recipe) if static else []
    N, L, _ = calib_x.shape
    G = min(opts.grid_samples, N)
    x_fp, x_q = calib_x, calib_x
    reports = []
    runner = BlockRunner(q_model.config, q_model.prefix_len, L, mesh)
    bar = tqdm(range(len(q_model.layers)), desc="calibrate", disable=not progress, leave=False)
    for layer in bar:
        fpb, qb = fp_blocks[layer], q_model.layers[layer]
        rep = {"layer": layer}
        if weight_clip is not None and recipe.weight is not None:
            rep["weights"] = init_block_weights(runner, qb, layer, recipe, x_q, opts, weight_clip)
        target_fp = runner.forward(fpb, x_fp, CHUNK)
        if sites:
            raw = runner.ranges(qb, x_q, CHUNK)
            ranges = {s: _site_range(*raw[s], recipe.spec(s)) for s in sites}
            init_qparams(qb, recipe, ranges)
            xg = jnp.asarray(x_q[:G])
            tg = jnp.asarray(target_fp[:G] if opts.target == "fp" else runner.forward(fpb, x_q[:G], CHUNK))
            xg, tg = runner.place(xg, tg)  # on the mesh once (no mesh: as they are)
            ratios = {s: 1.0 for s in sites}
            if opts.kv_rule == "head":
                ratios.update(_kv_by_head(runner, qb, recipe, x_q[:G], ranges))
            for s in sites:
                _set_site(qb, s, recipe.spec(s), *ranges[s], ratios[s])
            rep["grid_loss_init"] = runner.loss(qb, xg, tg)
            searched = [s for s in sites if np.ndim(ratios[s]) == 0]  # not the per-head KV ratios of step 2
            _search_sites(runner, qb, recipe, searched, ranges, ratios, xg, tg, opts.search)
            rep["grid_loss"] = runner.loss(qb, xg, tg)
            rep["ratios"] = {s: (np.asarray(r).ravel().tolist() if np.ndim(r) else r) for s, r in ratios.items()}
        x_q = runner.forward(qb, x_q, CHUNK)
        x_fp = target_fp
        rep["out_mse"] = float(np.mean((x_q - x_fp) ** 2))
        reports.append(rep)
        bar.set_postfix(mse=f"{rep['out_mse']:.2e}")
    return reports


def gptq_at_scales(q_model, calib_x: np.ndarray, opts: QuantizeOptions, progress: bool = True, mesh=None) -> list[dict]:
    """GPTQ codes for q_model's kernels on the per-channel scales they already have (qparams[<linear>]["scale"]),
    block by block, in place: FlatQuant-GPTQ on the merged model, whose kernels are the transformed, LWC-clamped
    ones and whose Grams (opts.gptq_inputs) are of the transformed inputs the kernels see (the sites' transforms
    run in the forward; Capture sows after them). Block l's inputs come through the already GPTQ-quantized blocks
    0..l-1 behind the FP prefix. Per layer {"layer", "rtn_err": {linear: e}, "gptq_err": {linear: e}}, e the
    output error per token (quant/gptq.py output_error)."""
    recipe = q_model.recipe
    if recipe.weight is None:
        raise UserError(f"GPTQ needs quantized weights; {recipe.name!r} keeps them FP", "QuantizeOptions.gptq")
    spec, x_q, reports = recipe.weight, calib_x, []
    tokens = x_q.shape[0] * x_q.shape[1]
    runner = BlockRunner(q_model.config, q_model.prefix_len, x_q.shape[1], mesh)
    for layer in tqdm(range(len(q_model.layers)), desc="gptq", disable=not progress, leave=False):
        qb = q_model.layers[layer]
        grams, factors, rep = None, {}, {"layer": layer, "rtn_err": {}, "gptq_err": {}}
        for name in WEIGHT_NAMES:
            site = LINEAR_INPUT[name]
            if grams is None or (opts.gptq_inputs == "quantized" and site not in factors):
                grams = _grams(runner, qb, layer, recipe, x_q, opts)
            if site not in factors:
                factors[site] = inverse_hessian_factor(grams[site], opts.gptq_damp, opts.gptq_act_order)
            mod = qb.linear_module(name)
            w = np.asarray(mod.kernel[...], np.float32)
            scale = np.asarray(qb.qparams[name]["scale"][...], np.float32)
            rtn = round_to_grid(w, scale, spec)
            new = gptq_with_factor(w, factors[site], scale, spec)
            rep["rtn_err"][name] = output_error(w, rtn, grams[site]) / tokens
            rep["gptq_err"][name] = output_error(w, new, grams[site]) / tokens
            mod.kernel[...] = jnp.asarray(new, mod.kernel[...].dtype)
        x_q = runner.forward(qb, x_q, CHUNK)
        reports.append(rep)
    return reports
