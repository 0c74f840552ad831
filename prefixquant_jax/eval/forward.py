"""The jitted entry points every evaluation shares: pure functions of (graphdef, state), one compilation per model
structure and input shape. `model` is any Decoder (FP, fake-quant, packed integer), with its FP prefix inside; a
state placed on a device mesh (parallel.sharding.shard) runs sharded: jit follows its inputs' shardings."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


@functools.partial(jax.jit, static_argnums=0)
def logits(graphdef, state, tokens, cache):
    """(logits f32 [B, L, V], cache) of tokens [B, L] at cache.pos.."""
    return nnx.merge(graphdef, state)(tokens, cache)


@functools.partial(jax.jit, static_argnums=0)
def nll(graphdef, state, tokens, cache):
    """Summed NLL of tokens[:, 1:] given tokens[:, :-1] at cache.pos.. (float32 [])."""
    m = nnx.merge(graphdef, state)
    h, _ = m.hidden(tokens, cache)
    logp = jax.nn.log_softmax(m.head(h[:, :-1]), axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0].sum()


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def step(graphdef, state, tokens, cache):
    """(greedy next token int32 [B], cache) after tokens [B, L] at cache.pos..; the given cache is donated."""
    out, cache = nnx.merge(graphdef, state)(tokens, cache)
    return jnp.argmax(out[:, -1], axis=-1).astype(jnp.int32), cache
