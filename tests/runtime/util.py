"""What the runtime tests share: the jitted forward (eval.forward.logits), the real-vs-fake tolerance, and variants
of a quantized model under other recipes.

Tolerance of real (or fake with matmul "int") vs the default fake-quant logits: |a - b| <= 1e-5 * (1 + max|b|).
Both quantize with the same rounding (codes are equal), the integer accumulation is exact, and the epilogue
acc * s_x * s_w equals the fake (q_x s_x) @ (q_w s_w) up to float32 summation order, so the logits agree to a
few float32 ulps (~2e-7 seen). A larger gap would need a near-tie rounding that flips one activation or KV code.
Against the fake model with matmul "int" (with_recipe(qm.model, qm.recipe.replace(matmul="int"))) the xla
backend is exact: compared bit for bit, under jit (eager op-by-op execution rounds a few ops differently).
"""
import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefixquant_jax import presets
from prefixquant_jax.eval.forward import logits
from prefixquant_jax.nn.decoder import with_recipe
from prefixquant_jax.pipeline.stages import init_weight_scales

TOL = 1e-5


def close(a, b, tol=TOL):
    a, b = np.asarray(a), np.asarray(b)
    err = np.abs(a - b).max()
    assert err <= tol * (1 + np.abs(b).max()), (err, np.abs(b).max())


def forward(model, toks, cache=None, rows=None):
    """(logits float32 numpy [B, L, V], cache) of tokens [B, L] through the jitted eval.forward.logits; without
    `cache` on a fresh one of `rows` (default L) rows after the model's prefix."""
    toks = jnp.asarray(toks)
    if cache is None:
        cache = model.init_cache(toks.shape[0], rows or toks.shape[1])
    graphdef, state = nnx.split(model)
    out, cache = logits(graphdef, state, toks, cache)
    return np.asarray(out), cache


def prefill_then_decode(pm, toks, split=8):
    """(logits of toks[:, :split] in one call then one token at a time, the cache) on a cache of L rows."""
    part, cache = forward(pm, toks[:, :split], rows=toks.shape[1])
    outs = [part]
    for i in range(split, toks.shape[1]):
        step, cache = forward(pm, toks[:, i:i + 1], cache)
        outs.append(step)
    return np.concatenate(outs, axis=1), cache


def logits_of(model, toks):
    """Logits of a (fake-quant, FP or packed) model on tokens [B, L] behind its prefix, jitted."""
    return forward(model, toks)[0]


def int_matmul(qm):
    """The fake-quant model of QuantizedModel `qm` with matmul "int": the runtime's products (a new model)."""
    return with_recipe(qm.model, qm.recipe.replace(matmul="int"))


def variant(qm, init_weights=True, **kw):
    """qm under the recipe of its preset's definition with `kw` changed (presets._Definition fields: w_bits, a_bits,
    kv_bits, act_dynamic, kv_dynamic, act_clip, kv_clip, ...), on a clone of its model: the calibrated scales are
    reused (any valid scale exercises the same integer pipeline). New 8-bit weights get new RTN weight scales."""
    name = qm.recipe.name
    recipe = presets.recipe(name, dataclasses.replace(presets._DEFINITIONS[name], **kw))
    model = with_recipe(nnx.clone(qm.model), recipe)
    if init_weights and recipe.w_bits != qm.recipe.w_bits:
        init_weight_scales(model, recipe.weight, progress=False)
    return qm.replace(model=model)
