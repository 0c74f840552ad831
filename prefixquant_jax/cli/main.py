"""`prefixquant` command line: eval, generate, analyze, quantize, export-hf, export-prefix, lm-eval, plan.

Every user-facing failure is a `UserError`, printed as one line `error: ...` with exit status 2.
"""
from __future__ import annotations

import sys
import time

from prefixquant_jax.cli import lm_eval, plan, quantize
from prefixquant_jax.cli.args import (DTYPES, EXISTING_FILE, Parser, number, add_backend_args, add_eval_args, add_mesh_arg, add_model_args,
                                      mesh_spec, mesh_tag, write_json)
from prefixquant_jax.cli.flags import flag_error
from prefixquant_jax.errors import UserError
from prefixquant_jax.eval.data import load_text, tokenize, windows
from prefixquant_jax.eval.generate import encode_prompt, greedy
from prefixquant_jax.eval.models import load_for_eval
from prefixquant_jax.eval.perplexity import perplexity
from prefixquant_jax.parallel.distributed import initialize, is_primary


def _eval_model(args):
    return load_for_eval(args.model, DTYPES[args.dtype], getattr(args, "import_prefix", None), args.backend,
                         args.fake_matmul, args.kernels, mesh_spec(args))


def cmd_eval(args) -> dict:
    t0 = time.time()
    ev = _eval_model(args)
    P = ev.model.prefix_len
    if args.seqlen + P > ev.model.config.max_position_embeddings:
        raise UserError(f"--seqlen {args.seqlen} (+ prefix {P}) exceeds the model's max positions "
                        f"{ev.model.config.max_position_embeddings}")
    win = windows(tokenize(ev.tokenizer, load_text(args.data)), args.seqlen, args.max_windows)
    int_mm = args.fake_matmul == "int" and args.backend == "fake"
    res = perplexity(ev.model, win, batch_size=args.batch_size, log_path=args.eval_log, log_tag=mesh_tag(ev.mesh),
                     mesh=ev.mesh)
    res.update(model=args.model, data=args.data, dtype=args.dtype, recipe=ev.name, seconds=time.time() - t0,
               backend=args.backend, fake_matmul="int" if int_mm else "float",
               mesh=dict(ev.mesh.shape) if ev.mesh is not None else {"data": 1, "model": 1})
    print(f"{args.model} [{ev.name}{', real int4' if args.backend == 'real' else ''}] on {args.data}: ppl "
          f"{res['ppl']:.4f} ({res['windows']} windows x {args.seqlen} tokens, {res['seconds']:.1f}s)")
    return res


def cmd_generate(args) -> dict:
    ev = _eval_model(args)
    ids = encode_prompt(ev.tokenizer, args.prompt, chat=not args.no_chat)
    t0 = time.time()
    out = greedy(ev.model, ids, args.max_new_tokens, eos_id=ev.model.config.eos_token_id, mesh=ev.mesh)
    text = ev.tokenizer.decode(out, skip_special_tokens=True)
    print(text)
    return {"model": args.model, "recipe": ev.name, "backend": args.backend, "prompt": args.prompt, "output": text,
            "token_ids": out, "seconds": time.time() - t0}


HANDLERS = {"eval": cmd_eval, "generate": cmd_generate, **quantize.HANDLERS, **lm_eval.HANDLERS, **plan.HANDLERS}


def build_parser() -> Parser:
    ap = Parser(prog="prefixquant", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=Parser)

    p = sub.add_parser("eval", help="perplexity of a model on a text")
    add_model_args(p)
    add_eval_args(p)
    p.add_argument("--import-prefix", metavar="FILE", type=EXISTING_FILE, help="prefix KV safetensors (export-prefix) to put in front of every window")
    add_backend_args(p)
    add_mesh_arg(p)

    p = sub.add_parser("generate", help="greedy decoding with the KV cache")
    add_model_args(p)
    add_backend_args(p)
    add_mesh_arg(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=number(int, 1), default=64)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")

    quantize.add_subcommands(sub)
    lm_eval.add_subcommand(sub)
    plan.add_subcommand(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "quantize":  # several processes: before any JAX computation
            initialize(args.coordinator, args.num_processes, args.process_id)
        result = HANDLERS[args.cmd](args)
        if getattr(args, "json_out", None) and is_primary():
            write_json(args.json_out, result)
    except UserError as e:  # the library names its options; say them as our flags
        sys.stderr.write(f"error: {flag_error(e)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
