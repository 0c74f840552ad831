"""The rotated FP model (norms folded, R1/R2/R4 fused, R3/R4 online) computes the original function."""
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints_convert import load_checkpoint
from prefixquant_jax.model import Llama
from prefixquant_jax.quant.recipe import QuantRecipe
from prefixquant_jax.rotate.fuse import RotationConfig, rotate_params
from tests.conftest import make_tiny_hf, rng_tokens


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("rot", [RotationConfig(), RotationConfig(r1=True, r2=False, r3=False, r4=False),
                                 RotationConfig(r1=False, r2=True, r3=True, r4=False),
                                 RotationConfig(r1=False, r2=False, r3=False, r4=True, seed=3)])
def test_rotation_invariance_tiny(tmp_path, tied, rot):
    make_tiny_hf(tmp_path, tied=tied, tokenizer=False)
    ck = load_checkpoint(str(tmp_path))
    ids = jnp.asarray(rng_tokens(40, ck.config.vocab_size)[None])
    ref, _ = Llama.from_params(ck.config, ck.params)(ids)
    params, config = rotate_params(ck.params, ck.config, rot)
    assert not config.tie_word_embeddings
    np.testing.assert_allclose(np.asarray(params["layers"][0]["input_norm"]), 1.0)
    got, _ = Llama.from_params(config, params, recipe=QuantRecipe(r3=rot.r3, r4=rot.r4))(ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-4)
