"""GGUF (llama.cpp) Llama checkpoints, dequantized to float32 with the `gguf` package.

llama.cpp's converter permutes the rows of Q and K so that rotary pairs are interleaved
(x0, x1), (x2, x3), ...; the HF layout pairs dimension j with j + head_dim/2. We undo it per head.
"""
from __future__ import annotations

import numpy as np

from prefixquant_jax.config import ModelConfig
from prefixquant_jax.errors import UserError, describe
from checkpoints_convert.hf import check_shapes

_LAYER_KEYS = {
    "attn_norm.weight": ("input_norm",),
    "ffn_norm.weight": ("post_norm",),
    "attn_q.weight": ("attn", "q"),
    "attn_k.weight": ("attn", "k"),
    "attn_v.weight": ("attn", "v"),
    "attn_output.weight": ("attn", "o"),
    "ffn_gate.weight": ("mlp", "gate"),
    "ffn_up.weight": ("mlp", "up"),
    "ffn_down.weight": ("mlp", "down"),
}


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row interleave. w: [n_heads*head_dim, in] (HF [out, in] layout)."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def read_gguf(path: str) -> tuple[ModelConfig, dict]:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise UserError(f"{path}: cannot read GGUF file ({describe(e)})") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: GGUF architecture {arch!r} is not 'llama'")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise UserError(f"{path}: no token_embd.weight tensor")
    vocab = int(tensors["token_embd.weight"].shape[-1])
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    head_dim = int(_field(reader, "llama.rope.dimension_count", hidden // heads))
    scaling = None
    if _field(reader, "llama.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(_field(reader, "llama.rope.scaling.factor"))}
    config = ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_layers=int(_field(reader, "llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensors,
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )

    def deq(name):
        t = tensors[name]
        try:
            a = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise UserError(f"{path}: cannot dequantize {name} ({t.tensor_type.name}): {e}") from None
        # numpy shape is the reverse of ggml's: [rows=out, cols=in] for 2-D weights
        return np.asarray(a, dtype=np.float32).reshape([int(s) for s in reversed(t.shape)])

    params: dict = {"embed": deq("token_embd.weight"), "final_norm": deq("output_norm.weight"),
                    "layers": {i: {"attn": {}, "mlp": {}} for i in range(config.num_layers)}}
    if not config.tie_word_embeddings:
        params["lm_head"] = deq("output.weight").T
    for i in range(config.num_layers):
        for key, path_ in _LAYER_KEYS.items():
            name = f"blk.{i}.{key}"
            if name not in tensors:
                raise UserError(f"{path}: missing tensor {name}")
            a = deq(name)
            if key == "attn_q.weight":
                a = unpermute_rows(a, config.num_heads)
            elif key == "attn_k.weight":
                a = unpermute_rows(a, config.num_kv_heads)
            if len(path_) == 1:
                params["layers"][i][path_[0]] = a
            else:
                params["layers"][i][path_[0]][path_[1]] = a.T
    check_shapes(params, config, path)
    return config, params
