"""The real int4 runtime on the families whose layer differs from Llama's: Qwen2 (q/k/v biases added after the
integer GEMM) and Qwen3 (q/k RMSNorm before RoPE, head_dim 32 != hidden / heads), rotated, w4a4kv4-static.

Tolerances as in tests/runtime/util.py: real (xla backend) equals the fake model with matmul "int" bit for bit
(under jit); real vs the default fake logits |a - b| <= 1e-5 * (1 + max |b|) (same codes, exact integer
accumulation, float32 summation order only). The scales are the FP model's full ranges on two samples (no grid
search: any valid scales exercise the same integer pipeline); quantization is checked to be active.
"""
import numpy as np
import pytest
import torch

import prefixquant_jax as pq
from prefixquant_jax.nn.decoder import Decoder
from prefixquant_jax.pipeline.calibrate import _site_range, init_qparams, static_sites
from prefixquant_jax.pipeline.stages import init_weight_scales
from prefixquant_jax.prefix.outliers import capture_token_ranges
from prefixquant_jax.rotate.fuse import RotationConfig, rotate_params
from prefixquant_jax.runtime.pack import pack
from tests.conftest import make_tiny_family, rng_tokens
from tests.runtime.util import forward, int_matmul, logits_of


def quantized(path):
    """QuantizedModel w4a4kv4-static without a prefix."""
    ck = pq.load_checkpoint(path)
    recipe = pq.preset("w4a4kv4-static")
    params, config = rotate_params(ck.params, ck.config, RotationConfig(seed=0))
    fp = Decoder(config, params, recipe=recipe.fp_reference())
    q = Decoder(config, params, recipe=recipe)
    init_weight_scales(q, recipe.weight, progress=False)
    calib = np.stack([rng_tokens(16, config.vocab_size, seed=s) for s in (7, 8)])
    ranges = capture_token_ranges(fp, calib, progress=False)
    for i, blk in enumerate(q.layers):
        init_qparams(blk, recipe, {s: _site_range(ranges[s][0][i], ranges[s][1][i], recipe.spec(s))
                                   for s in static_sites(recipe)})
    return pq.QuantizedModel(model=q, report={})


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_real_equals_fake_logits(tmp_path, family):
    hf = make_tiny_family(tmp_path, family, tokenizer=False)
    qm = quantized(str(tmp_path))
    pm = pack(qm, backend="xla")
    attn = pm.layers[0].attn
    assert (attn.q.bias is not None) == (family == "qwen2") and (attn.q_norm is not None) == (family == "qwen3")
    toks = rng_tokens(24, qm.config.vocab_size, seed=9)[None]
    real, _ = forward(pm, toks)
    np.testing.assert_array_equal(real, logits_of(int_matmul(qm), toks))
    fake = logits_of(qm.model, toks)
    with torch.no_grad():  # the FP reference: transformers' logits (ours match them to 1e-4, tests/nn/test_families.py)
        fp = hf(torch.tensor(toks, dtype=torch.long)).logits.numpy()
    err = np.abs(real - fake).max()
    assert err <= 1e-5 * (1 + np.abs(fake).max()), err
    assert np.abs(fake - fp).max() > 100 * err + 1e-3  # quantization is active
