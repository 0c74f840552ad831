"""FlatQuant with Qwen2's q/k/v biases: the v bias follows P_v (before the merge in the forward, after it in the
stored bias), q/k biases sit before RoPE and P_k and stay; quantization off, the transformed model (unmerged and
merged) is the FP model: max abs diff <= 1e-5 * (1 + max |logit|), float32."""
import jax.numpy as jnp
import numpy as np
import pytest

import prefixquant_jax as pq
from prefixquant_jax.flatquant.merge import merge_model
from prefixquant_jax.flatquant.recipe import FlatQuantRecipe
from prefixquant_jax.nn.decoder import Decoder
from tests.conftest import make_tiny_family
from tests.flatquant.test_merge import flat_model


@pytest.mark.parametrize("param,kv_orig", [("inverse", False), pytest.param("orthogonal", True, marks=pytest.mark.slow)])
def test_bias_quant_off_equals_fp_and_merged(tmp_path, param, kv_orig):
    make_tiny_family(tmp_path, "qwen2", tokenizer=False)
    ck = pq.load_checkpoint(str(tmp_path))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 300, size=(2, 24)), jnp.int32)
    ref = np.asarray(Decoder(ck.config, ck.params)(tokens))
    q = flat_model(ck, FlatQuantRecipe(param=param, prefix=kv_orig))
    out = np.asarray(q(tokens))
    b0 = {n: np.asarray(getattr(q.layers[0].attn, n).bias[...]) for n in "qkv"}
    q, _ = merge_model(q)
    merged = np.asarray(q(tokens))
    b1 = {n: np.asarray(getattr(q.layers[0].attn, n).bias[...]) for n in "qkv"}
    np.testing.assert_array_equal(b1["q"], b0["q"])
    np.testing.assert_array_equal(b1["k"], b0["k"])
    assert np.abs(b1["v"] - b0["v"]).max() > 1e-2  # v's bias now holds b_v P_v
    tol = 1e-5 * (1 + np.abs(ref).max())
    assert np.abs(out - ref).max() <= tol
    assert np.abs(merged - ref).max() <= tol
