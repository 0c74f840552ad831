"""Next-token logits of a saved quantized model: fake quant, the real int4 runtime, and fake quant with its
embedding table perturbed by 1 + eps * N(0, 1) (how sensitive the fake model is to float-level noise).

Usage: python benchmarks/real_vs_fake_logits.py MODEL_DIR "prompt text" [--eps 1e-6] [--seeds 3]
                                                [--chat [--answer "start of the reply"]]
"""
import argparse

import jax.numpy as jnp
import numpy as np

from prefixquant_jax.eval.generate import encode_prompt
from prefixquant_jax.loading import load_for_inference
from prefixquant_jax.runtime import compile_loaded


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("prompt")
    ap.add_argument("--eps", type=float, default=1e-6)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--chat", action="store_true", help="apply the chat template")
    ap.add_argument("--answer", default="", help="text appended after the (templated) prompt")
    args = ap.parse_args()
    loaded = load_for_inference(args.model, jnp.float32)
    P = 0 if loaded.prefix_kv is None else loaded.prefix_kv.length
    ids = encode_prompt(loaded.tokenizer, args.prompt, chat=args.chat)
    if args.answer:
        ids += list(loaded.tokenizer(args.answer).input_ids)
    toks = jnp.asarray([ids], jnp.int32)

    def last(compiled):
        logits, _ = compiled.logits(compiled.state, toks, compiled.cache(1, P + len(ids), loaded.prefix_kv), P)
        return np.asarray(logits[0, -1], np.float64)

    def show(name, logits, base=None):
        top = np.argsort(-logits)[:3]
        cells = ", ".join(f"{loaded.tokenizer.decode([int(t)])!r} {logits[t]:.3f}" for t in top)
        print(f"{name:34s} {cells}" + ("" if base is None else f"   max|dlogit| {np.abs(logits - base).max():.3f}"))

    fake = loaded.compiled
    base = last(fake)
    show("fake", base)
    show("real", last(compile_loaded(loaded, args.model)), base)
    emb = fake.state["embed"]
    orig = emb[...]
    for seed in range(args.seeds):
        noise = np.random.default_rng(seed).normal(size=orig.shape)
        emb[...] = orig * (1 + args.eps * jnp.asarray(noise, jnp.float32))
        show(f"fake, embed x (1 + {args.eps:g} N), seed {seed}", last(fake), base)
    emb[...] = orig


if __name__ == "__main__":
    main()
