"""Next-token logits of a saved quantized model: fake quant, the real int4 runtime, and fake quant with its
embedding table perturbed by 1 + eps * N(0, 1) (how sensitive the fake model is to float-level noise).

Usage: python benchmarks/real_vs_fake_logits.py MODEL_DIR "prompt text" [--eps 1e-6] [--seeds 3]
                                                [--chat [--answer "start of the reply"]]
"""
import argparse

import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefixquant_jax.eval import forward
from prefixquant_jax.eval.generate import encode_prompt
from prefixquant_jax.eval.models import load_for_eval
from prefixquant_jax.runtime.pack import pack


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="a directory written by `prefixquant quantize --save`")
    ap.add_argument("prompt")
    ap.add_argument("--eps", type=float, default=1e-6)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--chat", action="store_true", help="apply the chat template")
    ap.add_argument("--answer", default="", help="text appended after the (templated) prompt")
    args = ap.parse_args(argv)
    loaded = load_for_eval(args.model, jnp.float32)  # the fake-quant model as saved
    if loaded.quantized is None:
        raise SystemExit(f"error: {args.model} is not a saved quantized model (prefixquant quantize --save DIR)")
    tok = loaded.tokenizer
    ids = encode_prompt(tok, args.prompt, chat=args.chat)
    if args.answer:
        ids += list(tok(args.answer).input_ids)
    toks = jnp.asarray([ids], jnp.int32)

    def last(model):  # the jitted forward every evaluation runs, behind the model's own FP prefix
        graphdef, state = nnx.split(model)
        logits, _ = forward.logits(graphdef, state, toks, model.init_cache(1, len(ids)))
        return np.asarray(logits[0, -1], np.float64)

    def show(name, logits, base=None):
        top = np.argsort(-logits)[:3]
        cells = ", ".join(f"{tok.decode([int(t)])!r} {logits[t]:.3f}" for t in top)
        print(f"{name:34s} {cells}" + ("" if base is None else f"   max|dlogit| {np.abs(logits - base).max():.3f}"))

    fake = loaded.model
    base = last(fake)
    show("fake", base)
    show("real", last(pack(loaded.quantized)), base)
    orig = np.asarray(fake.embed[...])
    for seed in range(args.seeds):
        noisy = nnx.clone(fake)  # a copy: the loaded model stays as it is
        noise = np.random.default_rng(seed).normal(size=orig.shape)
        noisy.embed[...] = jnp.asarray(orig * (1 + args.eps * noise), jnp.float32)
        show(f"fake, embed x (1 + {args.eps:g} N), seed {seed}", last(noisy), base)


if __name__ == "__main__":
    main()
