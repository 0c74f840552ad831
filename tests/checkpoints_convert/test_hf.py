"""HF checkpoints (safetensors, torch .bin) load into a model whose logits match transformers fp32."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from checkpoints_convert import export_hf, load_checkpoint
from prefixquant_jax.errors import UserError
from prefixquant_jax.model import Llama
from tests.conftest import make_tiny_hf, rng_tokens

TOL = 1e-4  # max abs logit difference vs transformers fp32


def _ref_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids[None], dtype=torch.long)).logits[0].numpy()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("gqa,tied,rope", [(True, False, "default"), (False, True, "default"),
                                           (True, True, "llama3"), (False, False, "llama3")])
def test_logits_match_transformers(tmp_path, fmt, gqa, tied, rope):
    ref = make_tiny_hf(tmp_path, gqa=gqa, tied=tied, rope=rope, fmt=fmt, tokenizer=False)
    ck = load_checkpoint(str(tmp_path))
    assert ck.config.tie_word_embeddings == tied
    assert ck.config.rope_type == rope
    ids = rng_tokens(48, ck.config.vocab_size)
    logits, _ = Llama.from_params(ck.config, ck.params)(jnp.asarray(ids[None]))
    np.testing.assert_allclose(np.asarray(logits[0]), _ref_logits(ref, ids), atol=TOL, rtol=0)


def test_sharded_safetensors(tmp_path):
    import torch
    from transformers import LlamaForCausalLM
    from tests.conftest import tiny_hf_config

    torch.manual_seed(1)
    ref = LlamaForCausalLM(tiny_hf_config()).eval()
    ref.save_pretrained(tmp_path, max_shard_size="50KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ck = load_checkpoint(str(tmp_path))
    ids = rng_tokens(20, ck.config.vocab_size, seed=3)
    logits, _ = Llama.from_params(ck.config, ck.params)(jnp.asarray(ids[None]))
    np.testing.assert_allclose(np.asarray(logits[0]), _ref_logits(ref, ids), atol=TOL, rtol=0)


def test_export_round_trip(tmp_path):
    from transformers import LlamaForCausalLM

    make_tiny_hf(tmp_path / "src", tokenizer=False)
    ck = load_checkpoint(str(tmp_path / "src"))
    export_hf(ck.params, ck.config, str(tmp_path / "out"))
    again = load_checkpoint(str(tmp_path / "out"))
    assert again.config == ck.config
    for a, b in zip(_leaves(ck.params), _leaves(again.params)):
        np.testing.assert_array_equal(a, b)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = rng_tokens(30, ck.config.vocab_size, seed=2)
    logits, _ = Llama.from_params(ck.config, ck.params)(jnp.asarray(ids[None]))
    np.testing.assert_allclose(np.asarray(logits[0]), _ref_logits(hf, ids), atol=TOL, rtol=0)
    with pytest.raises(UserError, match="already exists"):
        export_hf(ck.params, ck.config, str(tmp_path / "out"))


def _leaves(tree):
    import jax
    return jax.tree_util.tree_leaves(tree)


def test_non_llama_config_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match="gpt2.*not a Llama"):
        load_checkpoint(str(tmp_path))


def test_shape_mismatch_named(tmp_path):
    make_tiny_hf(tmp_path, tokenizer=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="shape mismatch for layers.0.mlp"):
        load_checkpoint(str(tmp_path))


def test_export_rotated_loads_in_transformers(tmp_path):
    """An R1/R2-rotated export loads in transformers and gives our rotated model's logits (and the original's)."""
    from transformers import LlamaForCausalLM

    from checkpoints_convert.hf import export_rotated_hf
    from prefixquant_jax.rotate.fuse import RotationConfig, rotate_params

    ref = make_tiny_hf(tmp_path / "src", tied=True, tokenizer=False)
    ck = load_checkpoint(str(tmp_path / "src"))
    export_rotated_hf(ck.params, ck.config, str(tmp_path / "rot"), seed=7)
    cfg = json.loads((tmp_path / "rot" / "config.json").read_text())
    assert cfg["prefixquant"]["seed"] == 7 and cfg["tie_word_embeddings"] is False
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "rot").eval()
    params, config = rotate_params(ck.params, ck.config, RotationConfig(r3=False, r4=False, seed=7))
    ids = rng_tokens(30, ck.config.vocab_size, seed=5)
    ours, _ = Llama.from_params(config, params)(jnp.asarray(ids[None]))
    np.testing.assert_allclose(_ref_logits(hf, ids), np.asarray(ours[0]), atol=TOL, rtol=0)
    np.testing.assert_allclose(_ref_logits(hf, ids), _ref_logits(ref, ids), atol=2e-4, rtol=0)
    # the weights really are rotated, not a copy
    assert not np.allclose(np.asarray(params["embed"]), ck.params["embed"])
