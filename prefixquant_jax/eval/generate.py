"""Greedy decoding with the KV cache, behind the model's FP prefix."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefixquant_jax.errors import UserError
from prefixquant_jax.eval.forward import step
from prefixquant_jax.parallel.sharding import place_batch


def greedy(model, prompt_ids, max_new_tokens: int, eos_id: int | None = None, mesh=None) -> list[int]:
    """Greedy-decode up to `max_new_tokens` after `prompt_ids` (any Decoder; `mesh`: the mesh its state was put
    on by parallel.sharding.shard, None: one device)."""
    P = model.prefix_len
    prompt = np.asarray(prompt_ids, np.int32)[None]
    total = P + prompt.shape[1] + max_new_tokens
    if total > model.config.max_position_embeddings:
        raise UserError(f"prompt ({prompt.shape[1]}) + prefix ({P}) + max new tokens ({max_new_tokens}) exceeds max "
                        f"positions {model.config.max_position_embeddings}")
    graphdef, state = nnx.split(model)
    cache = place_batch(mesh, model.init_cache(1, prompt.shape[1] + max_new_tokens))
    nxt, cache = step(graphdef, state, place_batch(mesh, jnp.asarray(prompt)), cache)
    out = []
    for _ in range(max_new_tokens):
        t = int(nxt[0])
        out.append(t)
        if eos_id is not None and t == eos_id:
            break
        nxt, cache = step(graphdef, state, place_batch(mesh, jnp.asarray([[t]], jnp.int32)), cache)
    return out


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """Prompt ids, through the chat template when the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(prompt).input_ids)
