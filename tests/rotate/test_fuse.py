"""The rotated FP model (norms folded, R1/R2/R4 fused, R3/R4 online) computes the original function."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import prefixquant_jax as pq
from prefixquant_jax.nn.decoder import Decoder
from prefixquant_jax.quant.recipe import QuantRecipe
from prefixquant_jax.rotate.fuse import RotationConfig, rotate_params
from prefixquant_jax.rotate.hadamard import hadamard_transform
from tests.conftest import make_tiny_hf, rng_tokens


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnlineRotations(QuantRecipe):
    """R3 (q, k after RoPE) and R4 (down_proj input) each on or off: QuantRecipe.rotate turns both on together,
    while RotationConfig fuses each rotation on its own; this lets each online half meet its offline half."""

    r3: bool = False
    r4: bool = False

    def apply_site(self, name, x, qparams, block=None):
        if name in ("q_rot", "k_rot"):
            return hadamard_transform(x) if self.r3 else x
        if name == "down_rot":
            return hadamard_transform(x) if self.r4 else x
        return super().apply_site(name, x, qparams, block)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def ck(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("tied" if request.param else "untied")
    make_tiny_hf(path, tied=request.param, tokenizer=False)
    return pq.load_checkpoint(str(path))


@pytest.mark.parametrize("rot", [RotationConfig(), RotationConfig(r1=True, r2=False, r3=False, r4=False),
                                 RotationConfig(r1=False, r2=True, r3=True, r4=False),
                                 RotationConfig(r1=False, r2=False, r3=False, r4=True, seed=3)])
def test_rotation_invariance_tiny(ck, rot):
    ids = jnp.asarray(rng_tokens(40, ck.config.vocab_size)[None])
    ref = Decoder(ck.config, ck.params)(ids)
    params, config = rotate_params(ck.params, ck.config, rot)
    assert not config.tie_word_embeddings
    np.testing.assert_allclose(np.asarray(params["layers"][0]["input_norm"]), 1.0)
    got = Decoder(config, params, recipe=OnlineRotations(r3=rot.r3, r4=rot.r4))(ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-4)
    if rot.r3 and rot.r4:  # R1-R4 together: the recipes' own `rotate`
        got = Decoder(config, params, recipe=QuantRecipe(rotate=True))(ids)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-4)
