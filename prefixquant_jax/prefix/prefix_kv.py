"""PrefixKV: the KV cache of the prefix tokens, computed once by the (rotated) FP model, never quantized."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from prefixquant_jax.kv_cache import KVCache


@dataclasses.dataclass
class PrefixKV:
    """k[i], v[i]: [1, P, kv_heads, head_dim] float32 for layer i, at positions 0..P-1.

    K is stored as the attention reads it: after RoPE and, when `k_rotated`, after the online R3.
    `token_ids`: the prefix ids (what options and reports call `prefix_ids`), under the name the prefix
    file and saved-model formats use for them.
    """

    k: list
    v: list
    token_ids: list[int]
    text: str = ""
    k_rotated: bool = False

    @property
    def length(self) -> int:
        return len(self.token_ids)


def compute_prefix_kv(model, prefix_ids, text: str = "", k_rotated: bool = False) -> PrefixKV:
    """Run the FP model over the prefix tokens at positions 0..P-1 and keep its cache (fp32)."""
    ids = jnp.asarray(np.asarray(prefix_ids, np.int32)[None])
    cache = KVCache.empty(model.config, 1, len(prefix_ids), jnp.float32)
    _, cache = model.hidden(ids, cache, 0)
    return PrefixKV(k=[np.asarray(a, np.float32) for a in cache.k], v=[np.asarray(a, np.float32) for a in cache.v],
                    token_ids=[int(t) for t in prefix_ids], text=text, k_rotated=k_rotated)
