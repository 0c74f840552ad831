"""RealCompiled: the packed int4 model behind the interface of prefixquant_jax.compiled.Compiled.

eval.perplexity.perplexity and eval.generate.greedy call `compiled.cache(batch, max_len, prefix_kv)`,
`compiled.nll/logits/step(state, tokens, cache, offset)` with `offset` the absolute position of
tokens[:, 0] (the prefix occupies positions 0..P-1), and read `compiled.model.config`. Here the state
is the PackedModel, the cache a QuantKVCache of max_len - P rows (the FP prefix is in the PackedModel);
offsets go to runtime.model as they are (positions). One compilation per input shape, as for the fake-quant model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from prefixquant_jax.errors import UserError
from prefixquant_jax.kv_cache import prefix_len
from prefixquant_jax.runtime.model import (
    empty_cache,
    head,
    head_jit,
    hidden_jit,
    hidden_jit_donating,
)
from prefixquant_jax.runtime.pack import PackedModel, pack


@jax.jit
def _nll_of(pm: PackedModel, h, tokens):
    """Summed NLL of tokens[:, 1:] given final hidden h [B, L, D] (as compiled.Compiled.nll)."""
    logp = jax.nn.log_softmax(head(pm, h[:, :-1]), axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0].sum()


@jax.jit
def _next_token(pm: PackedModel, h):
    """Greedy next token int32 [B] from the last position of h [B, L, D]."""
    return jnp.argmax(head(pm, h[:, -1]), axis=-1).astype(jnp.int32)


class RealCompiled:
    """Jitted real-quant entry points over a PackedModel (duck-types compiled.Compiled)."""

    def __init__(self, packed: PackedModel, prefix_kv=None):
        self.model = packed  # .config and .dtype, as Compiled.model has
        self.state = packed
        self.prefix_kv = prefix_kv  # the PrefixKV packed in (eval fingerprints); its rows live in the PackedModel
        self.prefix_len = packed.spec.prefix_len

        def _logits(state, tokens, cache, offset):
            h, cache = hidden_jit(state, tokens, cache, offset)
            return head_jit(state, h), cache

        def _nll(state, tokens, cache, offset):
            h, _ = hidden_jit(state, tokens, cache, offset)
            return _nll_of(state, h, tokens)

        def _step(state, token, cache, offset):
            h, cache = hidden_jit_donating(state, token, cache, offset)
            return _next_token(state, h), cache

        # plain functions over the shared jitted pieces of runtime.model, so every RealCompiled (and
        # prefill / decode_step) reuses one compilation per (spec, shape)
        self.logits, self.nll, self.step = _logits, _nll, _step

    def cache(self, batch: int, max_len: int, prefix_kv=None):
        """A cache for positions 0..max_len-1; the prefix part (P rows) is the packed model's own FP prefix."""
        P = self.state.spec.prefix_len
        pkv = self.prefix_kv if prefix_kv is None else prefix_kv
        if prefix_len(pkv) != P:
            raise UserError(f"the packed model was built with a {P}-token prefix, got {prefix_len(pkv)}")
        return empty_cache(self.state, batch, max_len - P)


def compile_loaded(loaded, model_spec: str, backend: str | None = None, dtype=None) -> RealCompiled:
    """RealCompiled for a pipeline.Loaded from a saved quantized model (with its possibly imported prefix KV).

    A full-precision checkpoint (no quantized model) or a preset the runtime cannot run: UserError."""
    qm = getattr(loaded, "quantized", None)
    if qm is None:
        raise UserError(f"backend 'real' needs a quantized model saved by pq.save; {model_spec!r} is a full-precision "
                        "checkpoint", "backend 'real'", "pq.save")
    return RealCompiled(pack(qm, backend=backend, dtype=dtype, prefix_kv=loaded.prefix_kv), loaded.prefix_kv)
