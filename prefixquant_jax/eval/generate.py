"""Greedy decoding with the KV cache."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from prefixquant_jax.errors import UserError
from prefixquant_jax.compiled import Compiled
from prefixquant_jax.kv_cache import prefix_len


def greedy(compiled: Compiled, prompt_ids, max_new_tokens: int, eos_id: int | None = None, prefix_kv=None) -> list[int]:
    """Greedy-decode up to `max_new_tokens` after `prompt_ids` behind `prefix_kv` (default: the one `compiled`
    runs behind)."""
    config = compiled.model.config
    prefix_kv = getattr(compiled, "prefix_kv", None) if prefix_kv is None else prefix_kv
    P = prefix_len(prefix_kv)
    prompt = np.asarray(prompt_ids, np.int32)[None]
    total = P + prompt.shape[1] + max_new_tokens
    if total > config.max_position_embeddings:
        raise UserError(f"prompt ({prompt.shape[1]}) + prefix ({P}) + max new tokens ({max_new_tokens}) exceeds max positions {config.max_position_embeddings}")
    cache = compiled.cache(1, total, prefix_kv)
    nxt, cache = compiled.step(compiled.state, jnp.asarray(prompt), cache, P)
    out, pos = [], P + prompt.shape[1]
    for _ in range(max_new_tokens):
        t = int(nxt[0])
        out.append(t)
        if eos_id is not None and t == eos_id:
            break
        nxt, cache = compiled.step(compiled.state, jnp.asarray([[t]], jnp.int32), cache, pos)
        pos += 1
    return out


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """Prompt ids, through the chat template when the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(prompt).input_ids)
