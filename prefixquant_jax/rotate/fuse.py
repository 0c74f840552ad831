"""Offline rotation of a Llama's params (QuaRot/SpinQuant style): fold norms, fuse R1, R2, R4.

Conventions (kernels are [in, out], activations are row vectors, every R is orthogonal):
  fold    RMSNorm weight g moves into the rows of the kernels reading the norm: W <- diag(g) W, g <- 1
  R1      residual stream x -> x R1: embed <- embed R1; readers W <- R1^T W; writers (o, down) W <- W R1;
          lm_head <- R1^T lm_head (tied embeddings are untied: the head has the final norm folded in)
  R2      per head on V / o_proj input: V columns of each KV head <- . R2; o_proj rows of each head <- R2^T .
  R4      online x -> x H on the down_proj input (site `down_rot`); offline down <- H^T down
  R3      online Hadamard on Q and K after RoPE (sites `q_rot`, `k_rot`); nothing offline
The rotated FP model computes the same function as the original (up to float rounding).

Biases and q/k norms (Qwen2, Qwen3; model.py): a bias is added after its product, so a rotation on the
input side of a linear (norm folding, R1: x W + b -> (x R1)(R1^T W) + b) leaves it as it is, and one on the
output side rotates it with the columns: R2 on V gives b_v -> b_v R2 per KV head (o has no bias). Qwen3's
q_norm / k_norm (RMSNorm over each head, between the projection and RoPE) stay in place, unfolded: their
statistics are taken over the projection's output, which R1 leaves unchanged, and their weights cannot
move into the kernel (they act after the normalization) nor past RoPE (which mixes dims j and j + hd/2).
R3 therefore stays after RoPE, i.e. after the norms too: q' = RoPE(q_norm(q)) H, k' = RoPE(k_norm(k)) H,
and q' k'^T = q k^T for the orthogonal H, so attention is unchanged; R2 acts on V, which has no norm.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from checkpoints_convert.lazy import LazyLayers, streamed
from prefixquant_jax.nn.config import ModelConfig
from prefixquant_jax.rotate.hadamard import hadamard_matrix, random_hadamard


@dataclasses.dataclass(frozen=True, kw_only=True)
class RotationConfig:
    r1: bool = True
    r2: bool = True
    r3: bool = True
    r4: bool = True
    seed: int = 0

    @property
    def any_offline(self) -> bool:
        return self.r1 or self.r2 or self.r4


_PASS = ("q_bias", "k_bias", "v_bias", "q_norm", "k_norm")  # unchanged by folding and R1 (module docstring)


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _fold_layer(lp: dict) -> dict:
    """One layer's params with its norms folded into the kernels reading them (float64)."""
    gi, gp = _f64(lp["input_norm"]), _f64(lp["post_norm"])
    return {
        "input_norm": np.ones_like(gi), "post_norm": np.ones_like(gp),
        "attn": {"q": gi[:, None] * _f64(lp["attn"]["q"]), "k": gi[:, None] * _f64(lp["attn"]["k"]),
                 "v": gi[:, None] * _f64(lp["attn"]["v"]), "o": _f64(lp["attn"]["o"]),
                 **{n: _f64(lp["attn"][n]) for n in _PASS if n in lp["attn"]}},
        "mlp": {"gate": gp[:, None] * _f64(lp["mlp"]["gate"]), "up": gp[:, None] * _f64(lp["mlp"]["up"]),
                "down": _f64(lp["mlp"]["down"])},
    }


def _fold_outer(params: dict, config: ModelConfig) -> tuple[dict, ModelConfig]:
    """Embeddings, head (with the final norm folded in) and final norm, float64; the untied config."""
    p = {"embed": _f64(params["embed"])}
    head = _f64(params["embed"]).T if config.tie_word_embeddings else _f64(params["lm_head"])
    g = _f64(params["final_norm"])
    p["lm_head"] = g[:, None] * head
    p["final_norm"] = np.ones_like(g)
    return p, dataclasses.replace(config, tie_word_embeddings=False)


def fold_norms(params: dict, config: ModelConfig) -> tuple[dict, ModelConfig]:
    """Fold every RMSNorm weight into the kernels that read it; the norms become all-ones."""
    p, new_config = _fold_outer(params, config)
    p["layers"] = {i: _fold_layer(lp) for i, lp in params["layers"].items()}
    return p, new_config


def _per_head_cols(w, n_heads, hd, R):
    return (w.reshape(w.shape[0], n_heads, hd) @ R).reshape(w.shape)


def _per_head_rows(w, n_heads, hd, R):
    """Each head's row block w_h -> R^T w_h."""
    return np.einsum("ji,hjd->hid", R, w.reshape(n_heads, hd, w.shape[1])).reshape(w.shape)


def _matrices(config: ModelConfig, rot: RotationConfig) -> tuple:
    """(R1, R2, H4), each None when that rotation is off (float64)."""
    R1 = random_hadamard(config.hidden_size, rot.seed) if rot.r1 else None
    R2 = random_hadamard(config.head_dim, rot.seed + 1) if rot.r2 else None
    H4 = hadamard_matrix(config.intermediate_size) if rot.r4 else None
    return R1, R2, H4


def _rotate_folded_layer(lp: dict, config: ModelConfig, mats: tuple) -> dict:
    """R1, R2, R4 fused into one folded layer (float64, in place); returns it."""
    R1, R2, H4 = mats
    hd = config.head_dim
    a, m = lp["attn"], lp["mlp"]
    if R1 is not None:
        for n in ("q", "k", "v"):
            a[n] = R1.T @ a[n]
        m["gate"], m["up"] = R1.T @ m["gate"], R1.T @ m["up"]
        a["o"], m["down"] = a["o"] @ R1, m["down"] @ R1
    if R2 is not None:
        a["v"] = _per_head_cols(a["v"], config.num_kv_heads, hd, R2)
        a["o"] = _per_head_rows(a["o"], config.num_heads, hd, R2)
        if "v_bias" in a:
            a["v_bias"] = _per_head_cols(a["v_bias"][None], config.num_kv_heads, hd, R2)[0]
    if H4 is not None:
        m["down"] = H4.T @ m["down"]
    return lp


def _float32(tree):
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree)


def _rotate_outer(params: dict, config: ModelConfig, R1) -> tuple[dict, ModelConfig]:
    p, config = _fold_outer(params, config)
    if R1 is not None:
        p["embed"] = p["embed"] @ R1
        p["lm_head"] = R1.T @ p["lm_head"]
    return _float32(p), config


def rotate_layer(lp: dict, config: ModelConfig, rot: RotationConfig, mats: tuple | None = None) -> dict:
    """One layer's params folded and rotated (float32), as rotate_params gives it; `config` the original one,
    `mats` the (R1, R2, H4) of _matrices (computed when None)."""
    return _float32(_rotate_folded_layer(_fold_layer(lp), config, mats or _matrices(config, rot)))


def rotate_params(params: dict, config: ModelConfig, rot: RotationConfig) -> tuple[dict, ModelConfig]:
    """Fold norms and fuse R1, R2, R4 into the weights. Returns float32 params and the untied config."""
    mats = _matrices(config, rot)
    p, new_config = _rotate_outer(params, config, mats[0])
    p["layers"] = {i: rotate_layer(lp, config, rot, mats) for i, lp in params["layers"].items()}
    return p, new_config


class LazyRotation:
    """rotate_params one layer at a time: `params` (embeddings and head rotated now, float32) whose "layers" is
    a LazyLayers (lazy_layers.py) folding and rotating layer i of the source params each time it is asked for
    (a lazy source read without keeping it), so the host holds one rotated layer, not a rotated model. The rotation matrices are kept until `release()`
    (R4's Hadamard of the MLP width is large: 14336^2 float64 = 1.5 GiB for Llama-3-8B) and rebuilt if asked
    for again."""

    def __init__(self, params: dict, config: ModelConfig, rot: RotationConfig):
        self._source, self._config, self._rot, self._mats = streamed(params), config, rot, None
        self.params, self.config = _rotate_outer(params, config, self.matrices()[0])
        self.params["layers"] = LazyLayers(config.num_layers, self._layer, keep=False)

    def matrices(self) -> tuple:
        if self._mats is None:
            self._mats = _matrices(self._config, self._rot)
        return self._mats

    def release(self) -> None:
        self._mats = None

    def _layer(self, i: int) -> dict:
        return rotate_layer(self._source["layers"][i], self._config, self._rot, self.matrices())
