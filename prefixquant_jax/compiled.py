"""Jitted entry points over an NNX model: split once, compile once per input shape."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prefixquant_jax.kv_cache import KVCache, behind_prefix, prefix_len


class Compiled:
    """Holds (graphdef, state) of a model, the FP prefix KV it runs behind, and jitted pure functions over them.

    Every function takes the state explicitly so jit caches by shape only; the model's static
    parts (config, recipe) live in the graphdef. `offset` is the absolute position of tokens[:, 0]
    (P behind a P-token prefix; kv_cache.py).
    """

    def __init__(self, model, prefix_kv=None):
        self.model = model
        self.prefix_kv = prefix_kv
        self.graphdef, self.state = nnx.split(model)
        gd = self.graphdef

        def _logits(state, tokens, cache, offset):
            return nnx.merge(gd, state)(tokens, cache, offset)

        def _nll(state, tokens, cache, offset):
            m = nnx.merge(gd, state)
            h, _ = m.hidden(tokens, cache, offset)
            logp = jax.nn.log_softmax(m.head(h[:, :-1]), axis=-1)
            tok_nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
            return tok_nll.sum()

        def _step(state, token, cache, offset):
            logits, cache = nnx.merge(gd, state)(token, cache, offset)
            return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

        self.logits = jax.jit(_logits)
        self.nll = jax.jit(_nll)
        self.step = jax.jit(_step, donate_argnums=(2,))

    @property
    def prefix_len(self) -> int:
        return prefix_len(self.prefix_kv)

    def cache(self, batch: int, max_len: int, prefix_kv=None) -> KVCache:
        """A cache of positions 0..max_len-1 whose first rows hold `prefix_kv` (default: this model's own)."""
        pkv = self.prefix_kv if prefix_kv is None else prefix_kv
        return behind_prefix(pkv, self.model.config, batch, max_len - prefix_len(pkv), self.model.dtype)[0]
