"""GGUF round trip per family: a tiny random transformers model written with gguf.GGUFWriter as llama.cpp's
converter writes it (architecture llama for Llama-3 / Mistral, with Q/K rows permuted and a Llama-3 rope as
`rope_freqs.weight`; qwen2 with q/k/v biases and qwen3 with q/k norms, both unpermuted) loads back with
transformers' logits (max abs diff <= 1e-4, float32)."""
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from checkpoints_convert import FormatError, read_checkpoint, read_gguf_config
from checkpoints_convert.gguf_io import llama3_scaling
from prefixquant_jax.checkpoint.fp import load_checkpoint
from prefixquant_jax.errors import UserError
from prefixquant_jax.nn.config import ModelConfig
from prefixquant_jax.nn.decoder import Decoder
from tests.checkpoints_convert.test_gguf import llamacpp_permute
from tests.conftest import FAMILIES, make_tiny_family, needs_smollm2, rng_tokens, smollm2_path

TOL = 1e-4  # max abs logit difference vs transformers fp32

ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama", "llama3": "llama"}
NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
         "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
         "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
         "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
         "mlp.down_proj.weight": "ffn_down.weight", "self_attn.q_proj.bias": "attn_q.bias",
         "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
         "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}


def llamacpp_rope_freqs(c) -> np.ndarray:
    """llama.cpp's `rope_freqs` for a llama3 rope_scaling (convert_hf_to_gguf.py, LlamaModel)."""
    s = c.rope_parameters if getattr(c, "rope_parameters", None) else c.rope_scaling
    dim, base = c.head_dim, s.get("rope_theta", getattr(c, "rope_theta", None))
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def write_gguf(path, hf_model, family, arch=None, linear_factor=None):
    """hf_model as llama.cpp writes a GGUF of `family` (float32 tensors); linear_factor: a linear rope scaling
    in the metadata (rope.scaling.type / factor)."""
    import gguf

    c, arch = hf_model.config, arch or ARCH[family]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    sd = {k: v.numpy().astype(np.float32) for k, v in hf_model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    params = getattr(c, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(params.get("rope_theta", getattr(c, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if linear_factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(linear_factor)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    if family == "llama3":
        w.add_tensor("rope_freqs.weight", llamacpp_rope_freqs(c))
    for i in range(c.num_hidden_layers):
        for hf, gg in NAMES.items():
            if f"model.layers.{i}.{hf}" not in sd:
                continue
            a = sd[f"model.layers.{i}.{hf}"]
            if arch == "llama" and gg == "attn_q.weight":
                a = llamacpp_permute(a, c.num_attention_heads)
            elif arch == "llama" and gg == "attn_k.weight":
                a = llamacpp_permute(a, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}", np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids)[None], dtype=torch.long)).logits[0].numpy()


def our_logits(config, params, ids):
    return np.asarray(Decoder(config, params)(jnp.asarray(np.asarray(ids)[None]))[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_round_trip(tmp_path, family):
    ref = make_tiny_family(tmp_path / "hf", family, seed=4, tokenizer=False)
    write_gguf(tmp_path / "m.gguf", ref, family)
    ck = load_checkpoint(str(tmp_path / "m.gguf"))
    c = ck.config
    assert ck.kind == "gguf" and c.model_type == {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[ARCH[family]]
    want = (family == "qwen2", family == "qwen3", 32 if family == "qwen3" else 16)
    assert (c.attention_bias, c.qk_norm, c.head_dim) == want
    assert c.tie_word_embeddings == ref.config.tie_word_embeddings
    if family == "llama3":
        assert dict(c.rope_scaling) == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64.0}
    ids = rng_tokens(40, c.vocab_size, seed=4)
    assert np.abs(our_logits(c, ck.params, ids) - hf_logits(ref, ids)).max() <= TOL


def model_config_as_before(path) -> ModelConfig:
    """The ModelConfig that gguf_io built from GGUF metadata before it returned HF config dicts (its former
    _gguf_config, kept here as the reference): read_gguf_config's dict must give exactly this one."""
    import gguf

    r = gguf.GGUFReader(str(path))
    field = lambda key, default=None: r.fields[key].contents() if key in r.fields else default  # noqa: E731
    arch = field("general.architecture")
    meta = lambda key, default=None: field(f"{arch}.{key}", default)  # noqa: E731
    tensors = {t.name: t for t in r.tensors}
    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", meta("rope.dimension_count", hidden // heads)))
    theta = float(meta("rope.freq_base", 10000.0))
    scaling = None
    if meta("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(meta("rope.scaling.factor"))}
    elif "rope_freqs.weight" in tensors:
        t = tensors["rope_freqs.weight"]
        scaling = llama3_scaling(gguf.quants.dequantize(t.data, t.tensor_type), theta, head_dim)
    return ModelConfig(
        vocab_size=int(tensors["token_embd.weight"].shape[-1]), hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")), num_layers=int(meta("block_count")), num_heads=heads,
        num_kv_heads=int(meta("attention.head_count_kv", heads)), head_dim=head_dim, rope_theta=theta,
        rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensors, max_position_embeddings=int(meta("context_length", 2048)),
        bos_token_id=field("tokenizer.ggml.bos_token_id"), eos_token_id=field("tokenizer.ggml.eos_token_id"),
        model_type=arch, attention_bias=arch == "qwen2", qk_norm=arch == "qwen3")


def _assert_config_as_before(path):
    want = model_config_as_before(path)
    d = read_gguf_config(str(path))
    assert ModelConfig.from_hf_dict(d) == want
    assert ModelConfig.from_hf_dict(read_checkpoint(str(path)).hf_config) == want
    assert load_checkpoint(str(path)).config == want
    return want


@pytest.mark.parametrize("family,linear", [(f, None) for f in FAMILIES] + [("mistral", 4.0)])
def test_gguf_hf_config_gives_the_model_config_as_before(tmp_path, family, linear):
    """The tiny families (llama3: rope from rope_freqs; qwen2 biases; qwen3 q/k norms and head_dim != hidden/heads)
    and a linear rope scaling in the metadata."""
    ref = make_tiny_family(tmp_path / "hf", family, tokenizer=False)
    write_gguf(tmp_path / "m.gguf", ref, family, linear_factor=linear)
    c = _assert_config_as_before(tmp_path / "m.gguf")
    assert c.rope_type == ("linear" if linear else "llama3" if family == "llama3" else "default")


@needs_smollm2
def test_smollm2_hf_config_gives_the_model_config_as_before():
    c = _assert_config_as_before(smollm2_path())
    sizes = (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.bos_token_id, c.eos_token_id)
    assert sizes == (30, 9, 3, 64, 1, 2)


def test_gguf_unsupported_architecture(tmp_path):
    ref = make_tiny_family(tmp_path / "hf", "qwen2", tokenizer=False)
    write_gguf(tmp_path / "m.gguf", ref, "qwen2", arch="phi3")
    with pytest.raises(FormatError, match="m.gguf: GGUF architecture 'phi3' is not supported") as e:
        read_checkpoint(str(tmp_path / "m.gguf"))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="GGUF architecture 'phi3' is not supported"):
        load_checkpoint(str(tmp_path / "m.gguf"))


def test_gguf_qwen2_without_bias_is_named(tmp_path):
    """A qwen2 GGUF lacking its q bias: the missing tensor is named."""
    ref = make_tiny_family(tmp_path / "hf", "qwen2", tokenizer=False)
    ref.model.layers[0].self_attn.q_proj.bias = None
    write_gguf(tmp_path / "m.gguf", ref, "qwen2")
    with pytest.raises(FormatError, match="missing tensor blk.0.attn_q.bias"):
        read_checkpoint(str(tmp_path / "m.gguf"))


@pytest.mark.parametrize("theta,head_dim,ctx,factor", [(5e5, 128, 8192, 8.0), (5e5, 64, 8192, 32.0), (1e4, 16, 32, 8.0)])
def test_llama3_scaling_recovered(theta, head_dim, ctx, factor):
    """llama3_scaling inverts llama.cpp's rope_freqs: the same inverse frequencies (Llama-3.1 8B, 3.2 1B, tiny)."""
    import types
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ctx, "rope_theta": theta}
    cfg = types.SimpleNamespace(rope_parameters=scaling, head_dim=head_dim)
    got = llama3_scaling(llamacpp_rope_freqs(cfg), theta, head_dim)
    want = {k: v for k, v in scaling.items() if k != "rope_theta"}
    mk = lambda s: ModelConfig(vocab_size=1, hidden_size=head_dim, intermediate_size=1, num_layers=1, num_heads=1,  # noqa: E731
                               num_kv_heads=1, head_dim=head_dim, rope_theta=theta, rope_scaling=tuple(sorted(s.items())))
    np.testing.assert_allclose(mk(got).inv_freq(), mk(want).inv_freq(), rtol=1e-6)
    assert got["factor"] == factor
    with pytest.raises(FormatError, match="not a Llama-3 rope scaling"):
        llama3_scaling(np.linspace(1, factor, head_dim // 2) ** 1.5, theta, head_dim)
