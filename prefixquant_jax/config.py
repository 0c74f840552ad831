"""ModelConfig: the frozen description of a Llama-architecture model.

Built from a Hugging Face `config.json` dict or from GGUF metadata; `to_hf_dict` writes it back.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from prefixquant_jax.errors import UserError

LLAMA_MODEL_TYPES = ("llama", "mistral")
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

    def __post_init__(self):
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

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type not in LLAMA_MODEL_TYPES:
            raise UserError(f"{source}: model_type {model_type!r} ({', '.join(archs) or 'no architectures'}) is not a Llama-architecture model")
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
            )
        except KeyError as e:
            raise UserError(f"{source}: missing key {e.args[0]!r}") from None

    def to_hf_dict(self) -> dict:
        d = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
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


def _freeze(scaling):
    if not scaling:
        return None
    return tuple(sorted((str(k), v) for k, v in scaling.items() if not isinstance(v, (list, dict))))
