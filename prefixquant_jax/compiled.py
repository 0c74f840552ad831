"""Jitted entry points over an NNX model: split once, compile once per input shape."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prefixquant_jax.kv_cache import KVCache


class Compiled:
    """Holds (graphdef, state) of a model and jitted pure functions over them.

    Every function takes the state explicitly so jit caches by shape only; the model's static
    parts (config, recipe) live in the graphdef.
    """

    def __init__(self, model):
        self.model = model
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

    def cache(self, batch: int, max_len: int, prefix_kv=None) -> KVCache:
        if prefix_kv is None:
            return KVCache.empty(self.model.config, batch, max_len, self.model.dtype)
        return KVCache.with_prefix(prefix_kv, batch, max_len, self.model.dtype)
