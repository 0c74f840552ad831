"""Block-by-block initialisation of every quantizer from calibration data: weights, then static scales.

For block l, x_q are the inputs after the already-quantized blocks 0..l-1 and x_fp the FP model's
inputs, both behind the FP prefix KV. In each block, in order:

1. weights (`CalibConfig.weight_clip`): per-output-channel scales, either data-free ("mse": the clip
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
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from prefixquant_jax.compiled_block import CompiledBlock
from prefixquant_jax.errors import UserError
from prefixquant_jax.model import with_recipe
from prefixquant_jax.quant.clip_search import head_clip_attention, head_clip_reconstruction, output_aware_weight_clip
from prefixquant_jax.quant.gptq import LINEAR_INPUT, gptq_with_factor, inverse_hessian_factor, output_error
from prefixquant_jax.quant.ops import minmax, mse_clip_search, qparams_from_range
from prefixquant_jax.quant.recipe import QUANT_SITES, WEIGHT_NAMES

COARSE = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
FINE_STEPS = (-0.05, 0.05)
CLIP_GRID = tuple(float(r) for r in np.round(np.linspace(1.0, 0.5, 21), 3))  # 1.0, 0.975, ..., 0.5


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibConfig:
    grid_samples: int = 2  # calibration samples used inside the searches (the rest only for ranges / Grams)
    chunk: int = 8  # samples per block forward
    coarse: tuple = COARSE
    fine_steps: tuple = FINE_STEPS
    weight_clip: str | None = None  # None: weights left as they are (scales set elsewhere), "mse", "output"
    weight_ratios: tuple = CLIP_GRID
    gptq: bool = False
    gptq_damp: float = 0.01
    gptq_act_order: bool = False
    # "fp": every linear's Gram from the block run in FP on x_q; "quantized": linear groups in forward order
    # (q|k|v, o, gate|up, down), each Gram with the earlier groups' GPTQ weights and the dynamic quantizers on
    gptq_inputs: str = "fp"
    kv_rule: str = "site"  # "site" or "head"
    kv_ratios: tuple = CLIP_GRID
    search: str = "greedy"  # "greedy" or "alone"
    target: str = "fp"  # "fp" or "local"
    static: bool = True  # False: leave static scales unset (a resumed --train restores them)

    def __post_init__(self):
        for name, value, allowed in (("weight_clip", self.weight_clip, (None, "mse", "output")),
                                     ("kv_rule", self.kv_rule, ("site", "head")),
                                     ("gptq_inputs", self.gptq_inputs, ("fp", "quantized")),
                                     ("search", self.search, ("greedy", "alone")),
                                     ("target", self.target, ("fp", "local"))):
            if value not in allowed:
                raise UserError(f"calibration {name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        if self.gptq and self.weight_clip is None:
            raise UserError("GPTQ needs weight scales: set weight_clip")
        if self.gptq_inputs == "quantized" and not self.gptq:
            raise UserError("gptq_inputs 'quantized' needs gptq")


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


def _grams(compiled: CompiledBlock, qb, layer: int, recipe, x_q: np.ndarray, cfg: CalibConfig) -> dict:
    """{site: Gram} of the block's linear inputs on x_q: FP activations and weights as they are (cfg.gptq_inputs
    "fp"), or with the dynamic quantizers on ("quantized"; static ones are not calibrated yet)."""
    sites = () if cfg.gptq_inputs == "fp" else tuple((s, sp) for s, sp in recipe.sites if sp.dynamic)
    grams = compiled.grams(with_recipe(qb, recipe.replace(sites=sites, weight=None)), layer, x_q, cfg.chunk)
    for site, g in grams.items():
        if not np.all(np.isfinite(g)):
            raise UserError(f"non-finite activations at layer {layer} {site}")
    return grams


def init_block_weights(compiled: CompiledBlock, qb, layer: int, recipe, x_q: np.ndarray, cfg: CalibConfig) -> dict:
    """Step 1 (module docstring) for one block, in place: qparams[<name>] and, with GPTQ, the kernels.
    Returns {linear: {"mse": err, "output": err, "gptq": err}} output errors per token (those that apply)."""
    spec, grams, tokens = recipe.weight, None, x_q.shape[0] * x_q.shape[1]
    data_aware = cfg.weight_clip == "output" or cfg.gptq
    ratios = np.asarray(cfg.weight_ratios, np.float32)
    factors, errs = {}, {}
    for name in WEIGHT_NAMES:  # forward order: a linear's input site comes after the earlier linears' outputs
        site = LINEAR_INPUT[name]
        if data_aware and (grams is None or (cfg.gptq_inputs == "quantized" and site not in factors)):
            grams = _grams(compiled, qb, layer, recipe, x_q, cfg)  # once, or once per new input site
        mod = qb.linear_module(name)
        w = mod.kernel[...]
        ratio = _mse_ratio(w, spec, ratios)
        e = {}
        if grams is not None:
            g = grams[site]
            best, per_ratio = output_aware_weight_clip(w, g, spec, ratios)  # per_ratio [R, out]
            pick = lambda r: float(np.take_along_axis(np.asarray(per_ratio), _grid_index(ratios, r), 0).sum() / tokens)
            e["mse"] = pick(ratio)
            if cfg.weight_clip == "output":
                ratio = best
                e["output"] = pick(ratio)
        scale = qparams_from_range(*minmax(w, spec), spec, ratio)[0]
        if cfg.gptq:
            wn = np.asarray(w, np.float32)
            if site not in factors:  # once per shared input
                factors[site] = inverse_hessian_factor(grams[site], cfg.gptq_damp, cfg.gptq_act_order)
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


def _kv_by_head(compiled, qb, layer, recipe, x_g, ranges, cfg) -> dict:
    """Step 2: per-head clip ratios of the static per-head KV sites; returns {site: ratios [KV, 1]}."""
    caps = compiled.qkv(qb, layer, x_g, cfg.chunk)
    out = {}
    for site in ("k_cache", "v_cache"):
        spec = recipe.spec(site)
        if spec is None or spec.dynamic or spec.granularity != "head":
            continue
        lo, hi = ranges[site]
        if site == "k_cache":
            r, _ = head_clip_attention(caps["q_attn"], caps["k_cache_x"], spec, cfg.kv_ratios,
                                       compiled.prefix_keys(layer), lo, hi)
        else:
            r, _ = head_clip_reconstruction(caps["v_cache_x"], spec, cfg.kv_ratios, lo, hi)
        out[site] = np.asarray(r)
    return out


def _search_sites(compiled, qb, recipe, sites, ranges, ratios, xg, ck, cv, tg, cfg) -> None:
    """Step 3: coarse-then-fine clip search of `sites` (ratios updated in place)."""
    def loss_with(r: dict, run) -> float:
        for s in sites:  # in qb's variables, which `run` shares
            _set_site(qb, s, recipe.spec(s), *ranges[s], r[s])
        return compiled.loss(run, xg, ck, cv, tg)

    for s in sites:
        run = qb
        if cfg.search == "alone":  # this site's quantizer only: weights FP, every other site off
            run = with_recipe(qb, recipe.replace(sites=((s, recipe.spec(s)),), weight=None))
        best_r, best = ratios[s], None
        for grid in (cfg.coarse, None):
            cands = grid if grid is not None else [round(best_r + d, 4) for d in cfg.fine_steps
                                                  if 0.05 <= best_r + d <= 1.0]
            for r in cands:
                ratios[s] = r
                val = loss_with(ratios, run)
                if best is None or val < best:
                    best, best_r = val, r
        ratios[s] = best_r
    for s in sites:
        _set_site(qb, s, recipe.spec(s), *ranges[s], ratios[s])


def calibrate(fp_model, q_model, recipe, calib_x: np.ndarray, prefix_kv, cfg: CalibConfig = CalibConfig(),
              progress: bool = True, mesh=None) -> list[dict]:
    """Initialise q_model's quantizers block by block, in place (module docstring); per-layer reports.

    calib_x: embedded calibration tokens [N, L, D] (float32). fp_model / q_model share the config;
    q_model holds `recipe` (and, with weight_clip None, its weight scales already). fp_model: anything whose
    `.layers[l]` is FP block l (pipeline._FPBlocks builds it over q block l's arrays): it is read once per
    layer, before q block l is touched, and that block alone is held while layer l is calibrated.
    `mesh`: a (data, model) jax.sharding.Mesh the block forwards run on (compiled_block.CompiledBlock; the
    searches and GPTQ work on the host-gathered statistics); None: one device."""
    sites = static_sites(recipe) if cfg.static else []
    N, L, _ = calib_x.shape
    G = min(cfg.grid_samples, N)
    x_fp, x_q = calib_x, calib_x
    reports = []
    compiled = CompiledBlock(q_model.config, prefix_kv, L, mesh)
    bar = tqdm(range(len(q_model.layers)), desc="calibrate", disable=not progress, leave=False)
    for layer in bar:
        fpb, qb = fp_model.layers[layer], q_model.layers[layer]
        rep = {"layer": layer}
        if cfg.weight_clip is not None and recipe.weight is not None:
            rep["weights"] = init_block_weights(compiled, qb, layer, recipe, x_q, cfg)
        target_fp = compiled.forward(fpb, layer, x_fp, cfg.chunk)
        if sites:
            raw = compiled.ranges(qb, layer, x_q, cfg.chunk)
            ranges = {s: _site_range(*raw[s], recipe.spec(s)) for s in sites}
            init_qparams(qb, recipe, ranges)
            ck, cv = compiled.cache(layer, G, L)
            xg = jnp.asarray(x_q[:G])
            tg = jnp.asarray(target_fp[:G] if cfg.target == "fp" else compiled.forward(fpb, layer, x_q[:G], cfg.chunk))
            xg, ck, cv, tg = compiled.place(xg, ck, cv, tg)  # on the mesh once (no mesh: as they are)
            ratios = {s: 1.0 for s in sites}
            if cfg.kv_rule == "head":
                ratios.update(_kv_by_head(compiled, qb, layer, recipe, x_q[:G], ranges, cfg))
            for s in sites:
                _set_site(qb, s, recipe.spec(s), *ranges[s], ratios[s])
            rep["grid_loss_init"] = compiled.loss(qb, xg, ck, cv, tg)
            searched = [s for s in sites if np.ndim(ratios[s]) == 0]  # not the per-head KV ratios of step 2
            _search_sites(compiled, qb, recipe, searched, ranges, ratios, xg, ck, cv, tg, cfg)
            rep["grid_loss"] = compiled.loss(qb, xg, ck, cv, tg)
            rep["ratios"] = {s: (np.asarray(r).ravel().tolist() if np.ndim(r) else r) for s, r in ratios.items()}
        x_q = compiled.forward(qb, layer, x_q, cfg.chunk)
        x_fp = target_fp
        rep["out_mse"] = float(np.mean((x_q - x_fp) ** 2))
        reports.append(rep)
        bar.set_postfix(mse=f"{rep['out_mse']:.2e}")
    return reports


def calibrate_static(fp_model, q_model, recipe, calib_x, prefix_kv, cfg: CalibConfig = CalibConfig(),
                     progress: bool = True, mesh=None) -> list[dict]:
    """Static scales only (weights as they are): `calibrate` with weight_clip None."""
    return calibrate(fp_model, q_model, recipe, calib_x, prefix_kv, dataclasses.replace(cfg, weight_clip=None,
                                                                                        gptq=False), progress, mesh)
