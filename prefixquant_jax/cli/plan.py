"""Subcommand `plan`: per-device bytes of each stage for a model and a mesh (prefixquant_jax/plan.py), no weights read."""
from __future__ import annotations

from prefixquant_jax.cli.args import NEW_FILE, number
from prefixquant_jax.parallel.plan import BUILTIN, PlanOptions, format_plan, plan


def add_subcommand(sub) -> None:
    p = sub.add_parser("plan", help="per-device memory of each stage for a model on a mesh (jax.eval_shape, no weights read)")
    p.add_argument("--model", required=True, help=f"built-in config ({', '.join(BUILTIN)}), bundled name, HF directory "
                   "(its config.json) or .gguf file (its metadata)")
    p.add_argument("--mesh", metavar="data=D,model=M", default=None, help="the mesh to plan for (default data=1,model=1)")
    p.add_argument("--preset", default="w4a4kv4-static")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="load / eval dtype")
    p.add_argument("--runtime-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--calib-samples", type=number(int, 1), default=32)
    p.add_argument("--calib-seqlen", type=number(int, 2), default=512)
    p.add_argument("--train-batch-size", type=number(int, 1), default=4)
    p.add_argument("--train-seqlen", type=number(int, 2), default=1024)
    p.add_argument("--batch-size", type=number(int, 1), default=1, help="eval / runtime rows")
    p.add_argument("--seqlen", type=number(int, 2), default=2048, help="eval / runtime tokens per row")
    p.add_argument("--prefix-len", type=number(int, 0), help="prefix tokens (default 5 for a prefix preset, else 0)")
    p.add_argument("--device-gib", type=number(float, 0.0, open_low=True), help="device memory: mark the stages that do not fit")
    p.add_argument("--json", dest="json_out", metavar="OUT", type=NEW_FILE, help="write the plan as JSON to OUT")


def cmd_plan(args) -> dict:
    opts = PlanOptions(preset=args.preset, dtype=args.dtype, runtime_dtype=args.runtime_dtype,
                       calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                       train_batch_size=args.train_batch_size, train_seqlen=args.train_seqlen,
                       batch_size=args.batch_size, seqlen=args.seqlen, prefix_len=args.prefix_len)
    res = plan(args.model, args.mesh, opts)
    print(format_plan(res, args.device_gib))
    return res


HANDLERS = {"plan": cmd_plan}
