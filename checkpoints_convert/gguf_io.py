"""GGUF (llama.cpp) checkpoints of the `llama`, `qwen2` and `qwen3` architectures, dequantized to float32
with the `gguf` package, one decoder layer at a time when that layer is asked for (`read_gguf`; the file is
memory-mapped).

llama.cpp's converter permutes the rows of Q and K of the `llama` architecture (Llama, Mistral) so that
rotary pairs are interleaved (x0, x1), (x2, x3), ...; the HF layout pairs dimension j with j + head_dim/2.
We undo it per head, for `llama` only: its Qwen2/Qwen3 converters write Q and K (and their biases and
q/k norms) in the HF order. A Llama-3 rope is stored by llama.cpp as the per-frequency divisors
`rope_freqs.weight`, not as metadata; `llama3_scaling` recovers the HF rope_scaling from them.
"""
from __future__ import annotations

import numpy as np

from checkpoints_convert.errors import FormatError, describe
from checkpoints_convert.hf import Layout, ShapeOnly, check_shapes
from checkpoints_convert.lazy import LazyLayers

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
_BIAS_KEYS = {"attn_q.bias": ("attn", "q_bias"), "attn_k.bias": ("attn", "k_bias"), "attn_v.bias": ("attn", "v_bias")}
_NORM_KEYS = {"attn_q_norm.weight": ("attn", "q_norm"), "attn_k_norm.weight": ("attn", "k_norm")}
ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # GGUF general.architecture -> HF model_type
_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


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


def _llama3_inv_freq(inv: np.ndarray, s: dict) -> np.ndarray:
    """Inverse frequencies `inv` with HF's llama3 rope scaling `s` applied (transformers' _compute_llama3_parameters)."""
    factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    mid = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return np.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def llama3_scaling(freq_factors, theta: float, head_dim: int, low: float = 1.0, high: float = 4.0) -> dict | None:
    """HF `rope_scaling` of type llama3 whose per-frequency divisors equal llama.cpp's `rope_freqs` (None when
    they are all 1). llama.cpp writes 1 (short wavelengths), `factor` (long ones) and 1 / ((1 - s) / factor + s)
    between, s = (old_ctx / wavelen - low) / (high - low); with low/high the Llama-3.x values 1 and 4 this gives
    factor and old_ctx. FormatError when no such scaling reproduces the divisors."""
    f = np.asarray(freq_factors, np.float64).reshape(-1)
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if f.shape != inv.shape:
        raise FormatError(f"rope_freqs has {f.size} entries, head_dim / 2 = {inv.size}")
    if np.allclose(f, 1.0, rtol=0, atol=1e-6):
        return None
    factor, wavelen = float(f.max()), 2 * np.pi / inv
    mid = (f > 1 + 1e-5) & (f < factor * (1 - 1e-5))
    if mid.any():
        smooth = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        ctx = float(np.median(wavelen[mid] * (low + smooth * (high - low))))
    else:  # any old_ctx between the two groups' boundaries gives the same divisors
        lo_ctx = high * wavelen[f <= 1 + 1e-5].max(initial=0.0)
        hi_ctx = low * wavelen[f >= factor * (1 - 1e-5)].min(initial=np.inf)
        ctx = 8192.0 if lo_ctx < 8192.0 < hi_ctx else float(np.sqrt(max(lo_ctx, 1.0) * hi_ctx))
    if abs(ctx - round(ctx)) < 1e-3 * ctx:
        ctx = float(round(ctx))
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": ctx}
    if not np.allclose(_llama3_inv_freq(inv, scaling), inv / f, rtol=1e-4, atol=0):
        raise FormatError("rope_freqs.weight is not a Llama-3 rope scaling (low_freq_factor 1, high_freq_factor 4)")
    return scaling


def _open(path: str):
    import gguf

    try:
        return gguf.GGUFReader(path)  # memory-maps the file: no tensor is read here
    except Exception as e:
        raise FormatError(f"{path}: cannot read GGUF file ({describe(e)})") from None


def _dequantizer(path: str, tensors: dict):
    import gguf

    def deq(name):
        t = tensors[name]
        try:
            a = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise FormatError(f"{path}: cannot dequantize {name} ({t.tensor_type.name}): {e}") from None
        # numpy shape is the reverse of ggml's: [rows=out, cols=in] for 2-D weights
        return np.asarray(a, dtype=np.float32).reshape([int(s) for s in reversed(t.shape)])
    return deq


def _gguf_config(path: str, reader) -> tuple[dict, str, dict]:
    """(HF config dict, architecture, tensors by name) from the metadata (and the small rope_freqs tensor)."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHS:
        raise FormatError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHS)})")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise FormatError(f"{path}: no token_embd.weight tensor")
    deq = _dequantizer(path, tensors)

    def meta(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    hidden = int(meta("embedding_length"))
    heads = int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", meta("rope.dimension_count", hidden // heads)))
    theta = float(meta("rope.freq_base", 10000.0))
    scaling = None
    if meta("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(meta("rope.scaling.factor"))}
    elif "rope_freqs.weight" in tensors:
        try:
            scaling = llama3_scaling(deq("rope_freqs.weight"), theta, head_dim)
        except FormatError as e:
            raise FormatError(f"{path}: {e}") from None
    model_type = ARCHS[arch]
    config = {
        "architectures": [_HF_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "tie_word_embeddings": "output.weight" not in tensors,  # llama.cpp leaves out a tied head
        "max_position_embeddings": int(meta("context_length", 2048)),
        "hidden_act": "silu",
        "attention_bias": model_type == "qwen2",  # q/k/v biases (Qwen2's fixed layout)
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for key in ("bos_token_id", "eos_token_id"):
        if (v := _field(reader, f"tokenizer.ggml.{key}")) is not None:
            config[key] = int(v)
    return config, arch, tensors


def read_gguf_config(path: str) -> dict:
    """The HF config dict of a GGUF file, from its metadata only (`prefixquant plan`)."""
    return _gguf_config(path, _open(path))[0]


def read_gguf(path: str, lazy: bool = True, check_config=None) -> tuple[dict, dict]:
    """(HF config dict, params) of a GGUF file, float32. lazy (the default): params["layers"] is a
    checkpoints_convert.lazy.LazyLayers; the file is memory-mapped (gguf.GGUFReader) and layer i's tensors are
    dequantized when params["layers"][i] is first asked for (embeddings, final norm and head now), so the host
    holds the blocks being processed, not the model. Names and shapes are checked now, from the tensor infos.
    lazy=False: every layer dequantized now, into plain dicts (the same arrays). check_config(hf_config, path),
    when given, runs before any tensor is read (see hf.load_hf_dir)."""
    config, arch, tensors = _gguf_config(path, _open(path))
    if check_config is not None:
        check_config(config, path)
    layout = Layout.from_hf_dict(config, path)
    deq = _dequantizer(path, tensors)
    keys = dict(_LAYER_KEYS)
    keys.update(_BIAS_KEYS if layout.qkv_bias else {})
    keys.update(_NORM_KEYS if layout.qk_norm else {})
    permute = arch == "llama"  # llama.cpp interleaves rotary pairs of Q and K only for this architecture

    def put(layer: dict, where: tuple, a) -> None:
        if len(where) == 1:
            layer[where[0]] = a
        else:
            layer[where[0]][where[1]] = a.T if a.ndim == 2 else a

    shapes: dict = {"layers": {i: {"attn": {}, "mlp": {}} for i in range(layout.num_layers)}}
    for i in range(layout.num_layers):
        for key, where in keys.items():
            name = f"blk.{i}.{key}"
            if name not in tensors:
                raise FormatError(f"{path}: missing tensor {name}")
            put(shapes["layers"][i], where, ShapeOnly(int(n) for n in reversed(tensors[name].shape)))
        extra = [n for n in (*_BIAS_KEYS, *_NORM_KEYS, "attn_output.bias") if n not in keys and f"blk.{i}.{n}" in tensors]
        if extra:
            raise FormatError(f"{path}: unexpected tensor blk.{i}.{extra[0]} for GGUF architecture {arch!r}")
    params: dict = {"embed": deq("token_embd.weight"), "final_norm": deq("output_norm.weight")}
    if not layout.tie_word_embeddings:
        params["lm_head"] = deq("output.weight").T
    check_shapes({**params, "layers": shapes["layers"]}, config, path)

    def load(i: int) -> dict:
        layer: dict = {"attn": {}, "mlp": {}}
        for key, where in keys.items():
            a = deq(f"blk.{i}.{key}")
            if permute and key == "attn_q.weight":
                a = unpermute_rows(a, layout.num_heads)
            elif permute and key == "attn_k.weight":
                a = unpermute_rows(a, layout.num_kv_heads)
            put(layer, where, a)
        return layer

    params["layers"] = LazyLayers(layout.num_layers, load) if lazy else {i: load(i) for i in range(layout.num_layers)}
    return config, params
