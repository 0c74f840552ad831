"""`prefixquant` command line: eval, generate, analyze, quantize, export-hf, lm-eval, plan.

Every user-facing failure is a `UserError`, printed as one line `error: ...` with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

DTYPES = ("float32", "bfloat16")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        sys.stderr.write(f"error: {self.prog}: {message}\n")
        sys.exit(2)


def write_json(path: str, obj: dict) -> None:
    """Atomic write (temp file + rename) so a crash never leaves half a JSON file."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=float)
        f.write("\n")
    os.replace(tmp, path)


def _dtype(name: str):
    import jax.numpy as jnp
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _add_model_args(p, dtype=True):
    p.add_argument("--model", default="smollm2", help="bundled name (smollm2), HF directory, .gguf file, or saved quantized checkpoint")
    if dtype:
        p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the results as JSON to OUT")


def _add_eval_args(p, data_flag="--data"):
    p.add_argument(data_flag, default="wikitext2", help="wikitext2 (bundled test split) or a UTF-8 text file")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--eval-log", metavar="FILE.jsonl", help="append each window's NLL here and skip windows already in it "
                   "(resume a killed evaluation; the file is tied to this exact model and data)")


def _add_backend_arg(p):
    p.add_argument("--backend", default="fake", choices=("fake", "real"),
                   help="fake: fake-quantized float model; real: packed int4 integer runtime (needs --model DIR from quantize --save)")
    p.add_argument("--fake-matmul", default="float", choices=("float", "int"),
                   help="fake backend: multiply dequantized floats (default), or compute each quantized linear as the "
                        "integer runtime does (exact integer accumulation, then scales): the real runtime's numbers")
    p.add_argument("--kernels", default="auto", choices=("auto", "mosaic", "triton"),
                   help="real backend: Pallas GPU backend of the int4 GEMMs; auto: Mosaic GPU on an H100/H200, "
                        "Triton elsewhere (rotate+quantize and decode attention are Triton kernels either way)")


def _compiled(loaded, args):
    """The fake-quant Compiled (--fake-matmul int: integer products), or the real runtime's RealCompiled."""
    if getattr(args, "backend", "fake") != "real":
        if getattr(args, "fake_matmul", "float") == "int":
            return _int_matmul_compiled(loaded)
        return loaded.compiled
    import dataclasses

    from prefixquant_jax.runtime import RealCompiled, compile_loaded
    compiled = compile_loaded(loaded, args.model, dtype=_dtype(args.dtype))
    kernels = getattr(args, "kernels", "auto")
    if kernels == "auto":
        return compiled
    pm = compiled.state  # the PackedModel; RuntimeSpec.kernels picks the GEMMs' kernels (runtime/kernel_choice.py)
    return RealCompiled(dataclasses.replace(pm, spec=dataclasses.replace(pm.spec, kernels=kernels)), compiled.prefix_kv)


def _add_mesh_arg(p, default="all local devices on data"):
    p.add_argument("--mesh", metavar="data=D,model=M", default=None,
                   help=f"device mesh (default: {default}): batches split over data, weights over "
                        "model (Megatron: attention heads / MLP columns, o and down by rows); prefixquant_jax/sharding.py")


def _mesh_spec(args):
    from prefixquant_jax.sharding import MeshSpec
    return MeshSpec.parse(getattr(args, "mesh", None))


def _sharded(compiled, args):
    """`compiled` on the --mesh (itself on a one-device mesh: the single-device computation)."""
    from prefixquant_jax.sharding import shard
    return shard(compiled, _mesh_spec(args))


def _int_matmul_compiled(loaded):
    from prefixquant_jax.flatquant.recipe import FlatQuantRecipe
    from prefixquant_jax.model import with_recipe
    from prefixquant_jax.quant.recipe import QuantRecipe
    from prefixquant_jax.compiled import Compiled

    model = loaded.compiled.model
    recipe = model.layers[0].recipe
    ok = type(recipe) is QuantRecipe or (type(recipe) is FlatQuantRecipe and recipe.merged)
    if not ok or recipe.weight is None:
        raise_user(f"--fake-matmul int needs a model with quantized weights (FlatQuant: merged); preset {loaded.preset!r} "
                   "has none")
    return Compiled(with_recipe(model, recipe.replace(int_matmul=True)), loaded.prefix_kv)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="prefixquant", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    p = sub.add_parser("eval", help="perplexity of a model on a text")
    _add_model_args(p)
    _add_eval_args(p)
    p.add_argument("--import-prefix", metavar="FILE", help="prefix KV safetensors (export-prefix) to put in front of every window")
    _add_backend_arg(p)
    _add_mesh_arg(p)

    p = sub.add_parser("generate", help="greedy decoding with the KV cache")
    _add_model_args(p)
    _add_backend_arg(p)
    _add_mesh_arg(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")

    from prefixquant_jax import cli_quant
    cli_quant.add_subcommands(sub, _add_model_args, _add_eval_args, _add_mesh_arg)
    from prefixquant_jax import cli_lm_eval
    cli_lm_eval.add_subcommand(sub, _add_model_args, _add_backend_arg)
    from prefixquant_jax import cli_plan
    cli_plan.add_subcommand(sub)
    return ap


def cmd_eval(args) -> dict:
    from prefixquant_jax.eval.data import load_text, tokenize, windows
    from prefixquant_jax.eval.perplexity import perplexity
    from prefixquant_jax.loading import load_for_inference

    if args.seqlen < 2:
        raise_user(f"--seqlen must be >= 2, got {args.seqlen}")
    t0 = time.time()
    loaded = load_for_inference(args.model, _dtype(args.dtype), import_prefix=getattr(args, "import_prefix", None),
                                mesh=_mesh_spec(args))
    compiled = _sharded(_compiled(loaded, args), args)
    prefix_len = compiled.prefix_len
    if args.seqlen + prefix_len > loaded.config.max_position_embeddings:
        raise_user(f"--seqlen {args.seqlen} (+ prefix {prefix_len}) exceeds the model's max positions {loaded.config.max_position_embeddings}")
    text = load_text(args.data)
    ids = tokenize(loaded.tokenizer, text)
    win = windows(ids, args.seqlen, args.max_windows)
    int_mm = getattr(args, "fake_matmul", "float") == "int" and getattr(args, "backend", "fake") == "fake"
    tag = ",".join(t for t in ("fake-matmul=int" if int_mm else "", _mesh_tag(compiled)) if t)
    res = perplexity(compiled, win, batch_size=args.batch_size, log_path=args.eval_log, log_tag=tag)
    res.update(model=args.model, data=args.data, dtype=args.dtype, preset=loaded.preset, seconds=time.time() - t0,
               backend=getattr(args, "backend", "fake"), fake_matmul="int" if int_mm else "float",
               mesh=dict(compiled.mesh.shape) if hasattr(compiled, "mesh") else {"data": 1, "model": 1})
    print(f"{args.model} [{loaded.preset}{', real int4' if res['backend'] == 'real' else ''}] on {args.data}: ppl {res['ppl']:.4f} ({res['windows']} windows x {args.seqlen} tokens, {res['seconds']:.1f}s)")
    return res


def _mesh_tag(compiled) -> str:
    """Eval-log tag of a mesh whose `model` axis splits sums (data alone leaves every number as it is)."""
    mesh = getattr(compiled, "mesh", None)
    return f"mesh-model={mesh.shape['model']}" if mesh is not None and mesh.shape["model"] > 1 else ""


def cmd_generate(args) -> dict:
    from prefixquant_jax.eval.generate import encode_prompt, greedy
    from prefixquant_jax.loading import load_for_inference

    if args.max_new_tokens < 1:
        raise_user(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    loaded = load_for_inference(args.model, _dtype(args.dtype), mesh=_mesh_spec(args))
    compiled = _sharded(_compiled(loaded, args), args)
    ids = encode_prompt(loaded.tokenizer, args.prompt, chat=not args.no_chat)
    t0 = time.time()
    out = greedy(compiled, ids, args.max_new_tokens, eos_id=loaded.config.eos_token_id)
    text = loaded.tokenizer.decode(out, skip_special_tokens=True)
    print(text)
    return {"model": args.model, "preset": loaded.preset, "backend": getattr(args, "backend", "fake"), "prompt": args.prompt, "output": text,
            "token_ids": out,
            "seconds": time.time() - t0}


def _primary() -> bool:
    """Process 0 of a jax.distributed run (or the only process) writes the files."""
    import jax
    return jax.process_index() == 0


def raise_user(msg: str):
    from prefixquant_jax.errors import UserError
    raise UserError(msg)


def main(argv=None) -> int:
    from prefixquant_jax.errors import UserError

    args = build_parser().parse_args(argv)
    try:  # several processes: before any JAX computation
        if args.cmd == "quantize":
            from prefixquant_jax.distributed import initialize
            initialize(args.coordinator, args.num_processes, args.process_id)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    handlers = {"eval": cmd_eval, "generate": cmd_generate}
    from prefixquant_jax import cli_quant
    handlers.update(cli_quant.HANDLERS)
    from prefixquant_jax import cli_lm_eval
    handlers.update(cli_lm_eval.HANDLERS)
    from prefixquant_jax import cli_plan
    handlers.update(cli_plan.HANDLERS)
    try:
        result = handlers[args.cmd](args)
        if getattr(args, "json_out", None) and _primary():
            write_json(args.json_out, result)
    except UserError as e:  # the library names its options; say them as our flags
        sys.stderr.write(f"error: {cli_quant.flag_error(e)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
