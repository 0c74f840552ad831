"""Helpers of the pipeline and parallel tests: the FP reference a shared quantized model lacks (and a copy of it that
training may change), logits under jit. The CLI from tests: tests/cli/util.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def trainable(ck, qm):
    """A copy of `qm` (a shared tiny_quantized model is never changed) with the FP reference blocks that quantize
    gives a model it trains (`fp_blocks`: the checkpoint's layers, rotated one at a time when the recipe rotates);
    train it with pipeline.finetune.train_quantized."""
    from checkpoints_convert.lazy import streamed
    from prefixquant_jax.pipeline.fp_blocks import FPBlocks
    from prefixquant_jax.rotate.fuse import LazyRotation, RotationConfig

    recipe = qm.recipe
    if recipe.rotate:
        rot = LazyRotation(ck.params, ck.config, RotationConfig(seed=qm.report.get("seed", 0)))
        config, params = rot.config, rot.params
    else:
        config, params = ck.config, streamed(ck.params)
    fp_blocks = FPBlocks(config, params, recipe.fp_reference(), qm.prefix_kv)
    return qm.replace(model=copy_model(qm.model), fp_blocks=fp_blocks)


def copy_model(model):
    """A copy of `model` with copies of its arrays: training donates its block's arrays (the train step's
    donate_argnums), which would delete them in any model that shares them (nnx.clone shares the arrays)."""
    gd, state = nnx.split(model)
    return nnx.merge(gd, jax.tree.map(lambda a: jnp.array(a, copy=True), state))


def logits(model, tokens) -> np.ndarray:
    """model(tokens) under jit (eager op-by-op execution rounds a few ops differently)."""
    gd, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, t: nnx.merge(gd, s)(t))(state, np.asarray(tokens, np.int32)))
