"""HF checkpoints (safetensors, torch .bin) load into a model whose logits match transformers fp32; the shape
check works from the HF config dict alone."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import checkpoints_convert
from checkpoints_convert import FormatError, read_checkpoint
from checkpoints_convert.hf import check_shapes, expected_shapes
from prefixquant_jax.checkpoint.export import export_hf
from prefixquant_jax.checkpoint.fp import load_checkpoint
from prefixquant_jax.errors import UserError
from prefixquant_jax.nn.decoder import Decoder
from tests.conftest import make_tiny_family, make_tiny_hf, rng_tokens, tiny_family_config, tiny_hf_config

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
    assert ck.kind == "hf" and ck.config.tie_word_embeddings == tied
    assert ck.config.rope_type == rope
    ids = rng_tokens(48, ck.config.vocab_size)
    logits = Decoder(ck.config, ck.params)(jnp.asarray(ids[None]))
    np.testing.assert_allclose(np.asarray(logits[0]), _ref_logits(ref, ids), atol=TOL, rtol=0)


def test_sharded_safetensors(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    ref = LlamaForCausalLM(tiny_hf_config()).eval()
    ref.save_pretrained(tmp_path, max_shard_size="50KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ck = load_checkpoint(str(tmp_path))
    ids = rng_tokens(20, ck.config.vocab_size, seed=3)
    logits = Decoder(ck.config, ck.params)(jnp.asarray(ids[None]))
    np.testing.assert_allclose(np.asarray(logits[0]), _ref_logits(ref, ids), atol=TOL, rtol=0)


def test_raw_read_is_plain_data(tmp_path):
    """read_checkpoint: the config.json dict as written, params in our layout ([in, out] kernels) equal to the
    HF weights, float32 numpy."""
    ref = make_tiny_hf(tmp_path, tokenizer=False)
    raw = read_checkpoint(str(tmp_path))
    assert raw.kind == "hf" and raw.path == raw.name == str(tmp_path)
    assert raw.hf_config == json.loads((tmp_path / "config.json").read_text())
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    np.testing.assert_array_equal(raw.params["lm_head"], sd["lm_head.weight"].T)
    np.testing.assert_array_equal(raw.params["layers"][1]["attn"]["k"], sd["model.layers.1.self_attn.k_proj.weight"].T)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in jax.tree_util.tree_leaves(raw.params))


def test_export_round_trip(tmp_path):
    from transformers import LlamaForCausalLM

    make_tiny_hf(tmp_path / "src", tokenizer=False)
    ck = load_checkpoint(str(tmp_path / "src"))
    export_hf(ck.params, ck.config, str(tmp_path / "out"))
    again = load_checkpoint(str(tmp_path / "out"))
    assert again.config == ck.config
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == ck.config.to_hf_dict()
    for a, b in zip(jax.tree_util.tree_leaves(ck.params), jax.tree_util.tree_leaves(again.params)):
        np.testing.assert_array_equal(a, b)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = rng_tokens(30, ck.config.vocab_size, seed=2)
    logits = Decoder(ck.config, ck.params)(jnp.asarray(ids[None]))
    np.testing.assert_allclose(np.asarray(logits[0]), _ref_logits(hf, ids), atol=TOL, rtol=0)
    with pytest.raises(UserError, match="already exists"):
        export_hf(ck.params, ck.config, str(tmp_path / "out"))
    with pytest.raises(FormatError, match="already exists"):
        checkpoints_convert.export_hf(ck.params, ck.config.to_hf_dict(), str(tmp_path / "out"))


def test_raw_export_writes_the_given_dict(tmp_path):
    """export_hf writes the caller's HF dict as config.json (extra keys kept) and the params it describes."""
    make_tiny_hf(tmp_path / "src", tied=True, tokenizer=False)
    raw = read_checkpoint(str(tmp_path / "src"))
    cfg = {**raw.hf_config, "note": {"by": "test"}}
    checkpoints_convert.export_hf(raw.params, cfg, str(tmp_path / "out"))
    again = read_checkpoint(str(tmp_path / "out"))
    assert again.hf_config == cfg
    for a, b in zip(jax.tree_util.tree_leaves(raw.params), jax.tree_util.tree_leaves(again.params)):
        np.testing.assert_array_equal(a, b)


def test_non_llama_config_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match="gpt2.*not a Llama"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(FormatError, match=r"config.json: model_type 'gpt2' \(GPT2LMHeadModel\) is not a Llama"):
        read_checkpoint(str(tmp_path))


def test_config_is_checked_before_the_weights(tmp_path):
    """load_checkpoint's ModelConfig checks run before any tensor is looked at (here there are none)."""
    cfg = {**tiny_family_config("qwen3").to_dict(), "attention_bias": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="o_proj bias"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(FormatError, match="no \\*.safetensors or pytorch_model\\*.bin weights"):
        read_checkpoint(str(tmp_path))


def test_shape_mismatch_named(tmp_path):
    make_tiny_hf(tmp_path, tokenizer=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"shape mismatch for layers.0.mlp.gate: got \(64, 96\), "
                                          r"config says \(64, 100\)"):
        read_checkpoint(str(tmp_path))
    with pytest.raises(UserError, match="shape mismatch for layers.0.mlp"):
        load_checkpoint(str(tmp_path))


def test_unexpected_and_missing_tensors_named(tmp_path):
    """A Qwen2 state dict under a Llama config: the first bias is named; with qwen3's q/k norms asked for but
    absent, the first missing one is."""
    make_tiny_family(tmp_path, "qwen2", tokenizer=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    as_llama = {**cfg, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(as_llama))
    with pytest.raises(FormatError, match=r"unexpected tensor layers.0.attn.[qkv]_bias \(model_type 'llama' has no"):
        read_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3"}))
    with pytest.raises(FormatError, match="missing tensor layers.0.attn.q_norm"):
        read_checkpoint(str(tmp_path))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_expected_shapes_from_the_hf_dict(family):
    """head_dim (given, or hidden / heads), kv heads, Qwen2's q/k/v biases, Qwen3's q/k norms, the untied head."""
    d = (tiny_hf_config() if family == "llama" else tiny_family_config(family)).to_dict()
    hd = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
    s = expected_shapes(d)
    attn = s["layers"][1]["attn"]
    assert len(s["layers"]) == 2 and s["embed"] == (320, 64)
    assert attn["q"] == (64, 4 * hd) and attn["k"] == attn["v"] == (64, 2 * hd) and attn["o"] == (4 * hd, 64)
    assert ("q_bias" in attn, "k_norm" in attn) == (family == "qwen2", family == "qwen3")
    if family == "qwen2":
        assert (attn["q_bias"], attn["k_bias"]) == ((4 * hd,), (2 * hd,))
    if family == "qwen3":
        assert hd == 32 and attn["q_norm"] == attn["k_norm"] == (32,)
    assert ("lm_head" in s) == (not d["tie_word_embeddings"])
    with pytest.raises(FormatError, match="src: missing tensor embed"):
        check_shapes({"final_norm": np.zeros(64)}, d, "src")


def test_bad_config_dicts_are_one_line(tmp_path):
    d = tiny_hf_config().to_dict()
    with pytest.raises(FormatError, match="cfg: missing key 'intermediate_size'"):
        expected_shapes({k: v for k, v in d.items() if k != "intermediate_size"}, "cfg")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match="config.json: not valid JSON") as e:
        read_checkpoint(str(tmp_path))
    assert "\n" not in str(e.value)
