"""PrefixKV: the KV cache of the prefix tokens, computed once by the (rotated) FP model, never quantized."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from prefixquant_jax.kv_cache import KVCache


@dataclasses.dataclass(init=False)
class PrefixKV:
    """k[i], v[i]: [1, P, kv_heads, head_dim] float32 for layer i, at positions 0..P-1.

    K is stored as the attention reads it: after RoPE and, when `k_rotated`, after the online R3.
    `prefix_ids`: the prefix token ids, the one name options, reports, saved models and prefix files use;
    `token_ids`, their old name, is accepted by the constructor and readable as an alias (callers written
    before the rename).
    """

    k: list
    v: list
    prefix_ids: list[int]
    text: str = ""
    k_rotated: bool = False

    def __init__(self, k, v, prefix_ids=None, text: str = "", k_rotated: bool = False, *, token_ids=None):
        if (prefix_ids is None) == (token_ids is None):
            raise TypeError("PrefixKV needs prefix_ids (or its old name token_ids), exactly one of them")
        self.k, self.v, self.text, self.k_rotated = k, v, text, k_rotated
        self.prefix_ids = list(prefix_ids if prefix_ids is not None else token_ids)

    @property
    def token_ids(self) -> list[int]:
        """The old name of prefix_ids (prefix files, saved models and callers written before the rename)."""
        return self.prefix_ids

    @property
    def length(self) -> int:
        return len(self.prefix_ids)


def compute_prefix_kv(model, prefix_ids, text: str = "", k_rotated: bool = False) -> PrefixKV:
    """Run the FP model over the prefix tokens at positions 0..P-1 and keep its cache (fp32)."""
    ids = jnp.asarray(np.asarray(prefix_ids, np.int32)[None])
    cache = KVCache.empty(model.config, 1, len(prefix_ids), jnp.float32)
    _, cache = model.hidden(ids, cache, 0)
    return PrefixKV(k=[np.asarray(a, np.float32) for a in cache.k], v=[np.asarray(a, np.float32) for a in cache.v],
                    prefix_ids=[int(t) for t in prefix_ids], text=text, k_rotated=k_rotated)
