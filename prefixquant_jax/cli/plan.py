"""Subcommand `plan`: per-device bytes of each stage for a model and a mesh (prefixquant_jax/plan.py), no weights read."""
from __future__ import annotations

from prefixquant_jax.errors import UserError
from prefixquant_jax.parallel.plan import BUILTIN, PlanOptions, format_plan, plan


def add_subcommand(sub) -> None:
    p = sub.add_parser("plan", help="per-device memory of each stage for a model on a mesh (jax.eval_shape, no weights read)")
    p.add_argument("--model", required=True, help=f"built-in config ({', '.join(BUILTIN)}), bundled name, HF directory "
                   "(its config.json) or .gguf file (its metadata)")
    p.add_argument("--mesh", metavar="data=D,model=M", default=None, help="the mesh to plan for (default data=1,model=1)")
    p.add_argument("--preset", default="w4a4kv4-static")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="load / eval dtype")
    p.add_argument("--runtime-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--train-batch-size", type=int, default=4)
    p.add_argument("--train-seqlen", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1, help="eval / runtime rows")
    p.add_argument("--seqlen", type=int, default=2048, help="eval / runtime tokens per row")
    p.add_argument("--prefix-len", type=int, help="prefix tokens (default 5 for a prefix preset, else 0)")
    p.add_argument("--device-gib", type=float, help="device memory: mark the stages that do not fit")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the plan as JSON to OUT")


def cmd_plan(args) -> dict:
    for flag in ("calib_samples", "calib_seqlen", "train_batch_size", "train_seqlen", "batch_size", "seqlen"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.prefix_len is not None and args.prefix_len < 0:
        raise UserError(f"--prefix-len must be >= 0, got {args.prefix_len}")
    if args.device_gib is not None and args.device_gib <= 0:
        raise UserError(f"--device-gib must be > 0, got {args.device_gib}")
    opts = PlanOptions(preset=args.preset, dtype=args.dtype, runtime_dtype=args.runtime_dtype,
                       calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                       train_batch_size=args.train_batch_size, train_seqlen=args.train_seqlen,
                       batch_size=args.batch_size, seqlen=args.seqlen, prefix_len=args.prefix_len)
    res = plan(args.model, args.mesh, opts)
    print(format_plan(res, args.device_gib))
    return res


HANDLERS = {"plan": cmd_plan}
