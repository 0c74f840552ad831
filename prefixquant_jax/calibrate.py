"""Static calibration, block by block: activation/KV ranges, then a greedy grid search of clip ratios.

For block l, inputs x_q come from the already-quantized blocks 0..l-1 and the target is the FP
block l applied to its FP inputs x_fp (both behind the FP prefix KV). Each static site starts at
clip ratio 1 (scale from its full range over the calibration tokens; prefix tokens are never among
them) and is then tuned, one site at a time in forward order, over a coarse grid and a fine grid
around the coarse optimum, to minimise the block-output MSE.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from prefixquant_jax.kv_cache import KVCache
from prefixquant_jax.model import QuantParam, rope_tables
from prefixquant_jax.quant.ops import qparams_from_range
from prefixquant_jax.quant.recipe import QUANT_SITES, pair_ranges, sown_value

COARSE = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
FINE_STEPS = (-0.05, 0.05)


def _sown(block, *args) -> dict:
    """Run block(*args) and return what its recipe sowed (nnx.Intermediate), as a pure dict."""
    _, inter = nnx.capture(lambda b, *a: b(*a), nnx.Intermediate)(block, *args)
    return nnx.to_pure_dict(inter)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibConfig:
    grid_samples: int = 2  # calibration samples used inside the grid search (the rest only for ranges)
    chunk: int = 8  # samples per block forward
    coarse: tuple = COARSE
    fine_steps: tuple = FINE_STEPS


def static_sites(recipe) -> list[str]:
    return [s for s in QUANT_SITES if recipe.spec(s) is not None and not recipe.spec(s).dynamic]


def _site_range(lo, hi, spec):
    """Reduce per-token ranges to the spec's static granularity: per tensor -> [1,1,1]; per head -> [KV,1]."""
    if spec.granularity == "head":  # lo, hi: [N, L, KV]
        return lo.min(axis=(0, 1))[:, None], hi.max(axis=(0, 1))[:, None]
    return np.full((1, 1, 1), lo.min()), np.full((1, 1, 1), hi.max())


def init_qparams(block, recipe, ranges: dict) -> None:
    """Create the block's QuantParam scales (and zeros) from full ranges (clip ratio 1)."""
    for site in static_sites(recipe):
        spec = recipe.spec(site)
        lo, hi = ranges[site]
        scale, zero = qparams_from_range(jnp.asarray(lo), jnp.asarray(hi), spec, 1.0)
        block.qparams[site] = QuantParam(scale)
        if not spec.symmetric:
            block.qparams[site + "_zero"] = QuantParam(zero)


class BlockRunner:
    """Jitted block forward / range capture / loss behind the prefix KV of each layer.

    The block's graphdef is a static argument, so each distinct block structure (FP block, quantized
    block with its qparams) compiles once and every layer reuses it.
    """

    def __init__(self, config, prefix_kv, L):
        self.config = config
        self.P = 0 if prefix_kv is None else prefix_kv.length
        self.prefix_kv = prefix_kv
        self.cos, self.sin = rope_tables(config, self.P + jnp.arange(L))
        P = self.P

        def fwd(gd, state, x, ck, cv, cos, sin):
            return nnx.merge(gd, state)(x, ck, cv, P, cos, sin)[0]

        def capture(gd, state, x, ck, cv, cos, sin):
            b = nnx.merge(gd, state)
            b.recipe = b.recipe.replace(capture=True, sites=())
            return _sown(b, x, ck, cv, P, cos, sin)

        def gram(gd, state, x, ck, cv, cos, sin):
            b = nnx.merge(gd, state)
            b.recipe = b.recipe.replace(capture_gram=True)
            return _sown(b, x, ck, cv, P, cos, sin)

        def loss(gd, state, x, ck, cv, cos, sin, target):
            y = nnx.merge(gd, state)(x, ck, cv, P, cos, sin)[0]
            return jnp.mean((y.astype(jnp.float32) - target) ** 2)

        self._fwd = jax.jit(fwd, static_argnums=0)
        self._capture = jax.jit(capture, static_argnums=0)
        self._gram = jax.jit(gram, static_argnums=0)
        self._loss = jax.jit(loss, static_argnums=0)

    def cache(self, layer: int, n: int, L: int):
        c = self.config
        if self.prefix_kv is None:
            z = jnp.zeros((n, L, c.num_kv_heads, c.head_dim), jnp.float32)
            return z, z
        one_layer = KVCache(k=[self.prefix_kv.k[layer]], v=[self.prefix_kv.v[layer]])
        pk = KVCache.with_prefix(one_layer, n, self.P + L)
        return pk.k[0], pk.v[0]

    def _chunks(self, layer, x, chunk):
        for s in range(0, len(x), chunk):
            xb = jnp.asarray(x[s:s + chunk])
            yield (xb,) + self.cache(layer, len(xb), xb.shape[1])

    def forward(self, block, layer, x: np.ndarray, chunk: int) -> np.ndarray:
        gd, state = nnx.split(block)
        return np.concatenate([np.asarray(self._fwd(gd, state, xb, ck, cv, self.cos, self.sin))
                               for xb, ck, cv in self._chunks(layer, x, chunk)])

    def ranges(self, block, layer, x: np.ndarray, chunk: int) -> dict:
        """Per-token (min, max) of every quantization site's input, weights as in `block`, acts FP."""
        gd, state = nnx.split(block)
        acc: dict = {}
        for xb, ck, cv in self._chunks(layer, x, chunk):
            for k, v in self._capture(gd, state, xb, ck, cv, self.cos, self.sin).items():
                acc.setdefault(k, []).append(np.asarray(sown_value(v)))
        return pair_ranges({k: np.concatenate(v) for k, v in acc.items()})

    def grams(self, block, layer, x: np.ndarray, chunk: int) -> dict:
        """{site: sum over all tokens of x^T x [C, C] (float64)} at each activation site, as `block` runs."""
        gd, state = nnx.split(block)
        acc: dict = {}
        for xb, ck, cv in self._chunks(layer, x, chunk):
            for k, v in self._gram(gd, state, xb, ck, cv, self.cos, self.sin).items():
                site = k.removesuffix("_gram")
                acc[site] = acc.get(site, 0.0) + np.asarray(sown_value(v), np.float64)
        return acc

    def loss(self, block, x, ck, cv, target) -> float:
        gd, state = nnx.split(block)
        return float(self._loss(gd, state, x, ck, cv, self.cos, self.sin, target))


def calibrate_static(fp_model, q_model, recipe, calib_x: np.ndarray, prefix_kv, cfg: CalibConfig = CalibConfig(),
                     progress: bool = True) -> list[dict]:
    """Set static qparams of every block of q_model in place; returns per-layer reports.

    calib_x: embedded calibration tokens [N, L, D] (float32). fp_model / q_model share the config;
    q_model holds the RTN-quantized weights and `recipe`.
    """
    sites = static_sites(recipe)
    N, L, _ = calib_x.shape
    G = min(cfg.grid_samples, N)
    x_fp, x_q = calib_x, calib_x
    reports = []
    runner = BlockRunner(q_model.config, prefix_kv, L)
    bar = tqdm(range(len(q_model.layers)), desc="calibrate", disable=not progress, leave=False)
    for layer in bar:
        fpb, qb = fp_model.layers[layer], q_model.layers[layer]
        target = runner.forward(fpb, layer, x_fp, cfg.chunk)
        raw = runner.ranges(qb, layer, x_q, cfg.chunk)
        ranges = {s: _site_range(*raw[s], recipe.spec(s)) for s in sites}
        init_qparams(qb, recipe, ranges)
        ck, cv = runner.cache(layer, G, L)
        xg, tg = jnp.asarray(x_q[:G]), jnp.asarray(target[:G])

        def loss_with(ratios: dict) -> float:
            for s in sites:
                spec = recipe.spec(s)
                lo, hi = ranges[s]
                scale, zero = qparams_from_range(jnp.asarray(lo), jnp.asarray(hi), spec, ratios[s])
                qb.qparams[s][...] = scale
                if not spec.symmetric:
                    qb.qparams[s + "_zero"][...] = zero
            return runner.loss(qb, xg, ck, cv, tg)

        ratios = {s: 1.0 for s in sites}
        loss0 = loss_with(ratios)
        for s in sites:
            best_r, best = ratios[s], None
            for grid in (cfg.coarse, None):
                cands = grid if grid is not None else [round(best_r + d, 4) for d in cfg.fine_steps if 0.05 <= best_r + d <= 1.0]
                for r in cands:
                    ratios[s] = r
                    val = loss_with(ratios)
                    if best is None or val < best:
                        best, best_r = val, r
            ratios[s] = best_r
        loss1 = loss_with(ratios)
        x_q = runner.forward(qb, layer, x_q, cfg.chunk)
        x_fp = target
        mse_out = float(np.mean((x_q - x_fp) ** 2))
        reports.append({"layer": layer, "ratios": dict(ratios), "grid_loss_init": loss0, "grid_loss": loss1,
                        "out_mse": mse_out})
        bar.set_postfix(loss=f"{loss1:.2e}")
    return reports
