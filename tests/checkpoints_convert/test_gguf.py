"""GGUF import: a tiny Llama written with gguf.GGUFWriter (llama.cpp's Q/K row order) loads back exactly."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from checkpoints_convert import FormatError, read_checkpoint
from checkpoints_convert.gguf_io import unpermute_rows
from prefixquant_jax.checkpoint.fp import load_checkpoint
from prefixquant_jax.errors import UserError
from prefixquant_jax.nn.decoder import Decoder
from tests.conftest import make_tiny_hf, rng_tokens


def llamacpp_permute(w, n_heads):
    """The row order llama.cpp's converter writes for Q and K (pairs (j, j+hd/2) -> (2i, 2i+1))."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, -1).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_permute():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    np.testing.assert_array_equal(unpermute_rows(llamacpp_permute(w, 8), 8), w)


def write_gguf(path, hf_model, skip=()):
    """hf_model as a llama GGUF (float32 tensors); `skip`: tensor names left out."""
    import gguf

    c = hf_model.config
    sd = {k: v.numpy().astype(np.float32) for k, v in hf_model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta if hasattr(c, "rope_theta") else 10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            a = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                a = llamacpp_permute(a, c.num_attention_heads)
            elif gg == "attn_k":
                a = llamacpp_permute(a, c.num_key_value_heads)
            if f"blk.{i}.{gg}.weight" not in skip:
                w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_logits_match_transformers(tmp_path, tied):
    ref = make_tiny_hf(tmp_path / "hf", tied=tied, tokenizer=False)
    write_gguf(tmp_path / "tiny.gguf", ref)
    ck = load_checkpoint(str(tmp_path / "tiny.gguf"))
    assert ck.kind == "gguf" and ck.config.tie_word_embeddings == tied
    ids = rng_tokens(40, ck.config.vocab_size)
    logits = Decoder(ck.config, ck.params)(jnp.asarray(ids[None]))
    with torch.no_grad():
        want = ref(torch.tensor(ids[None], dtype=torch.long)).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(logits[0]), want, atol=1e-4, rtol=0)


def test_gguf_params_are_the_hf_weights(tmp_path):
    """The raw read: Q and K rows un-permuted, every kernel the transposed HF weight, bit for bit (float32 file)."""
    ref = make_tiny_hf(tmp_path / "hf", tied=False, tokenizer=False)
    write_gguf(tmp_path / "tiny.gguf", ref)
    raw = read_checkpoint(str(tmp_path / "tiny.gguf"))
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert raw.kind == "gguf" and raw.name == str(tmp_path / "tiny.gguf") and raw.hf_config["model_type"] == "llama"
    np.testing.assert_array_equal(raw.params["embed"], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(raw.params["lm_head"], sd["lm_head.weight"].T)
    for name, (group, key) in {"q_proj": ("attn", "q"), "k_proj": ("attn", "k"), "down_proj": ("mlp", "down")}.items():
        hf = sd[f"model.layers.1.{'self_attn' if group == 'attn' else 'mlp'}.{name}.weight"]
        np.testing.assert_array_equal(raw.params["layers"][1][group][key], hf.T)


def test_corrupt_gguf(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(FormatError, match="bad.gguf: cannot read GGUF file") as e:
        read_checkpoint(str(p))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="bad.gguf"):
        load_checkpoint(str(p))
