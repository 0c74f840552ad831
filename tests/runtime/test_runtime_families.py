"""The real int4 runtime on the families whose layer differs from Llama's: Qwen2 (q/k/v biases added after the
integer GEMM) and Qwen3 (q/k RMSNorm before RoPE, head_dim 32 != hidden / heads), rotated, w4a4kv4-static.

Tolerance as in test_runtime.py: real vs fake logits |a - b| <= 1e-5 * (1 + max |b|) (same codes, exact integer
accumulation, float32 summation order only). The scales are the FP model's full ranges on two samples (no
grid search: any valid scales exercise the same integer pipeline); quantization is checked to be active.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from checkpoints_convert import load_checkpoint
from prefixquant_jax.calibrate import _site_range, init_qparams, static_sites
from prefixquant_jax.model import Llama
from prefixquant_jax.pipeline import QuantizedModel, init_weight_scales
from prefixquant_jax.prefix.outliers import capture_token_ranges
from prefixquant_jax.quant.presets import get_preset
from prefixquant_jax.quant.recipe import QuantRecipe
from prefixquant_jax.rotate.fuse import RotationConfig, rotate_params
from prefixquant_jax.runtime import pack, prefill
from tests.conftest import make_tiny_family, rng_tokens


def quantized(path):
    ck = load_checkpoint(path)
    preset = get_preset("w4a4kv4-static")
    params, config = rotate_params(ck.params, ck.config, RotationConfig(seed=0))
    fp = Llama.from_params(config, params, recipe=QuantRecipe(r3=True, r4=True))
    q = Llama.from_params(config, params, recipe=preset.recipe())
    init_weight_scales(q, preset.weight_spec(), progress=False)
    calib = np.stack([rng_tokens(16, config.vocab_size, seed=s) for s in (7, 8)])
    ranges = capture_token_ranges(fp, calib, None, progress=False)
    recipe = q.layers[0].recipe
    for i, blk in enumerate(q.layers):
        init_qparams(blk, recipe, {s: _site_range(ranges[s][0][i], ranges[s][1][i], recipe.spec(s))
                                   for s in static_sites(recipe)})
    return QuantizedModel(config=config, model=q, fp_model=fp, prefix_kv=None, preset=preset, report={})


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_real_equals_fake_logits(tmp_path, family):
    make_tiny_family(tmp_path, family, tokenizer=False)
    qm = quantized(str(tmp_path))
    pm = pack(qm, backend="xla")
    lp = pm.layers[0]
    assert (lp.qkv_bias is not None) == (family == "qwen2") and (lp.q_norm is not None) == (family == "qwen3")
    toks = rng_tokens(24, qm.config.vocab_size, seed=9)[None]
    logits = nnx.jit(lambda m, t: m(t)[0])  # one compile instead of op-by-op dispatch
    fake = np.asarray(logits(qm.model, jnp.asarray(toks)))
    real = np.asarray(prefill(pm, jnp.asarray(toks))[0])
    fp = np.asarray(logits(qm.fp_model, jnp.asarray(toks)))
    err = np.abs(real - fake).max()
    assert err <= 1e-5 * (1 + np.abs(fake).max()), err
    assert np.abs(fake - fp).max() > 100 * err + 1e-3  # quantization is active
