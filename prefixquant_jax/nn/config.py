"""ModelConfig: the frozen description of a Llama-architecture decoder (Llama, Mistral, Qwen2, Qwen3).

Built from a Hugging Face `config.json` dict or from GGUF metadata; `to_hf_dict` writes it back with the
source family's `architectures` / `model_type`. The families differ only in what `FAMILIES` lists:
Qwen2 adds biases to q/k/v (`attention_bias`), Qwen3 a per-head RMSNorm on q and k before RoPE (`qk_norm`),
Mistral a sliding window (kept as `sliding_window`; a longer sequence is refused, see `check_length`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from prefixquant_jax.errors import UserError

# model_type -> (architecture, q/k/v biases, q/k RMSNorm): the differences between the supported families
FAMILIES = {"llama": ("LlamaForCausalLM", False, False), "mistral": ("MistralForCausalLM", False, False),
            "qwen2": ("Qwen2ForCausalLM", True, False), "qwen3": ("Qwen3ForCausalLM", False, True)}
LLAMA_MODEL_TYPES = tuple(FAMILIES)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shapes and constants of a Llama model.

    Invariants: hidden_size == num_heads * head_dim is *not* required (head_dim is explicit),
    num_heads % num_kv_heads == 0. `rope_scaling` is a tuple of sorted (key, value) pairs so the
    dataclass stays hashable (it is a static argument of jitted functions).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    model_type: str = "llama"  # the source family (FAMILIES); written back by to_hf_dict
    attention_bias: bool = False  # biases on q, k, v (Qwen2); never on o
    qk_norm: bool = False  # per-head RMSNorm (weights [head_dim]) on q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # Mistral's window when it is shorter than max_position_embeddings

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise UserError(f"model_type {self.model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise UserError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        rtype = self.rope_type
        if rtype not in SUPPORTED_ROPE_TYPES:
            raise UserError(f"unsupported rope_scaling type {rtype!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        d = dict(self.rope_scaling)
        return str(d.get("rope_type", d.get("type", "default")))

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def check_length(self, tokens: int) -> None:
        """UserError when `tokens` attended positions exceed the sliding window (which this code does not apply)."""
        if self.sliding_window is not None and tokens > self.sliding_window:
            raise UserError(f"{tokens} positions exceed the model's sliding_window={self.sliding_window}, which is not "
                            "implemented (use sequences of at most that length)")

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type not in FAMILIES:
            raise UserError(f"{source}: model_type {model_type!r} ({', '.join(archs) or 'no architectures'}) is not a "
                            f"Llama-architecture model (supported model_type: {', '.join(FAMILIES)})")
        _, bias, qk_norm = FAMILIES[model_type]
        if d.get("hidden_act", "silu") != "silu":
            raise UserError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (only silu)")
        if d.get("mlp_bias"):
            raise UserError(f"{source}: mlp_bias is not supported")
        if d.get("attention_bias") and not bias:
            raise UserError(f"{source}: attention_bias with model_type {model_type!r} (an o_proj bias) is not supported")
        try:
            hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
            scaling = d.get("rope_scaling")
            rope_theta = d.get("rope_theta")
            # transformers >= 5 may nest theta and scaling in `rope_parameters`
            params = d.get("rope_parameters") or {}
            if rope_theta is None:
                rope_theta = params.get("rope_theta", 10000.0)
            if scaling is None and params.get("rope_type", "default") != "default":
                scaling = {k: v for k, v in params.items() if k != "rope_theta"}
            eos = d.get("eos_token_id")
            return cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rope_theta=float(rope_theta),
                rope_scaling=_freeze(scaling),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=eos[0] if isinstance(eos, list) else eos,
                model_type=model_type,
                attention_bias=bias,
                qk_norm=qk_norm,
                sliding_window=_sliding_window(d, model_type, source),
            )
        except KeyError as e:
            raise UserError(f"{source}: missing key {e.args[0]!r}") from None

    def to_hf_dict(self) -> dict:
        d = {
            "architectures": [FAMILIES[self.model_type][0]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            d["eos_token_id"] = self.eos_token_id
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        elif self.model_type in ("qwen2", "qwen3"):
            del d["mlp_bias"]
            d.update(attention_bias=self.attention_bias, use_sliding_window=False, sliding_window=None)
        return d

    # ---- rotary embedding ----
    def inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies [head_dim // 2] in float64, with the configured scaling."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        rtype, s = self.rope_type, dict(self.rope_scaling or ())
        if rtype == "linear":
            inv = inv / float(s["factor"])
        elif rtype == "llama3":
            factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
            old_ctx = float(s["original_max_position_embeddings"])
            wavelen = 2 * np.pi / inv
            scaled = np.where(wavelen > old_ctx / lo, inv / factor, inv)
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            mid = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
            inv = np.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
        return inv


def _sliding_window(d: dict, model_type: str, source: str) -> int | None:
    """Mistral: its window when shorter than max_position_embeddings (None otherwise). Qwen2/3: UserError when
    `use_sliding_window` puts a window shorter than max_position_embeddings on any layer."""
    window, max_pos = d.get("sliding_window"), int(d.get("max_position_embeddings", 2048))
    if window is None or int(window) >= max_pos:
        return None
    if model_type == "mistral":
        return int(window)
    if model_type in ("qwen2", "qwen3") and d.get("use_sliding_window"):
        types = d.get("layer_types")
        n = int(d.get("num_hidden_layers", 0))
        active = ("sliding_attention" in types) if types else int(d.get("max_window_layers", n)) < n
        if active:
            raise UserError(f"{source}: use_sliding_window with sliding_window={window} < max_position_embeddings="
                            f"{max_pos} is not supported (sliding-window attention is not implemented)")
    return None


def _freeze(scaling):
    if not scaling:
        return None
    return tuple(sorted((str(k), v) for k, v in scaling.items() if not isinstance(v, (list, dict))))
