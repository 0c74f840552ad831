"""The FP prefix's K/V: computed once by the (rotated) FP model over the prefix tokens, never quantized."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from prefixquant_jax.nn.cache import PrefixKV


def compute_prefix_kv(model, prefix_ids, text: str = "", k_rotated: bool = False) -> PrefixKV:
    """Run the FP `model` (without a prefix of its own) over the prefix tokens at positions 0..P-1 and keep its
    K/V (fp32), K as attention reads it: after RoPE and `k_rotated` (the online R3 of a rotated model)."""
    ids = jnp.asarray(np.asarray(prefix_ids, np.int32)[None])
    _, cache = model.hidden(ids, model.init_cache(1, len(prefix_ids)))
    return PrefixKV(k=[np.asarray(kv.k[0], np.float32) for kv in cache.kv],
                    v=[np.asarray(kv.v[0], np.float32) for kv in cache.kv],
                    prefix_ids=[int(t) for t in prefix_ids], text=text, k_rotated=k_rotated)
