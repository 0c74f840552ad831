"""Subcommand `prefixquant lm-eval`: zero-shot (or few-shot) accuracy with lm-eval-harness.

    prefixquant lm-eval --model SPEC --tasks T1,T2 [--include-path DIR] [--backend fake|real]
                        [--kernels auto|mosaic|triton] [--limit N] [--num-fewshot K] [--batch-size B] [--json OUT]

Runs `lm_eval.simple_evaluate` on the `prefixquant-jax` model (prefixquant_jax/eval/lm_eval.py) with a
`TaskManager` that knows lm-eval's tasks, the tasks we ship (`lambada_wikitext2`) and --include-path;
prints lm-eval's table; --json OUT writes lm-eval's `results` dict (task -> {"acc,none": ...}) under
the key `results`.
"""
from __future__ import annotations

import difflib
import os
import time

from prefixquant_jax.cli.args import DTYPES, EXISTING_DIR, EXISTING_FILE, add_backend_args, add_model_args, number
from prefixquant_jax.errors import UserError
from prefixquant_jax.eval.models import load_for_eval

OFFLINE_HINT = ("offline, a dataset must already be in the local HF datasets cache (HF_DATASETS_CACHE; set "
                "HF_DATASETS_OFFLINE=1) or be given as a local task (--include-path DIR with a YAML using "
                "dataset_path: json and dataset_kwargs.data_files)")


def add_subcommand(sub) -> None:
    p = sub.add_parser("lm-eval", help="zero-shot accuracy on lm-eval-harness tasks (needs pip install -e .[eval])")
    add_model_args(p)
    add_backend_args(p)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task (or group) names, e.g. "
                   "lambada_wikitext2 (shipped, offline) or piqa,arc_easy,arc_challenge,hellaswag,winogrande")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR", type=EXISTING_DIR,
                   help="a directory of lm-eval task YAMLs (repeatable)")
    p.add_argument("--limit", type=number(float, 0.0, 1e9, open_low=True), help="at most N documents per task (a value below 1: that fraction)")
    p.add_argument("--num-fewshot", type=number(int, 0, 1000), help="few-shot examples per prompt (default: the task's, else 0)")
    p.add_argument("--batch-size", type=number(int, 1), default=8, help="rows per forward pass (static length buckets)")
    p.add_argument("--max-length", type=number(int, 2), help="max input tokens (default min(2048, max positions - prefix))")
    p.add_argument("--import-prefix", metavar="FILE", type=EXISTING_FILE, help="prefix KV safetensors (export-prefix) in front of every request")
    p.add_argument("--bootstrap-iters", type=number(int, 0), default=100000, help="lm-eval's bootstrap for stderrs (0: none)")
    p.add_argument("--seed", type=number(int, 0), default=0, help="lm-eval's random / few-shot seed")


_TASK_MANAGERS: dict = {}  # (include paths, with lm-eval's own tasks) -> TaskManager: indexing all tasks takes seconds


def task_manager(include: list[str], names: list[str] = ()):
    """A TaskManager over the tasks we ship, `include` and lm-eval's own tasks. When every name in `names` is
    a local task, lm-eval's own ~15k task configs are not indexed (include_defaults=False)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm-eval is not installed: pip install -e '.[eval]' (or pip install 'lm-eval>=0.4,<0.5')") from None
    from prefixquant_jax.eval.lm_eval import shipped_include_path

    for d in include:
        if not os.path.isdir(d):
            raise UserError(f"--include-path {d}: not a directory")
    paths = [shipped_include_path()] + [os.path.abspath(d) for d in include]
    if names:
        try:
            local = TaskManager(include_path=paths, include_defaults=False)
        except TypeError:  # an lm-eval without include_defaults
            local = None
        if local is not None and set(names) <= set(local.all_tasks):
            return local
    key = tuple(paths)
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(include_path=paths)
    return _TASK_MANAGERS[key]


def _check_tasks(tm, names: list[str]) -> None:
    """Unknown names, then each task's dataset (lm-eval loads it when it builds the task): one-line errors."""
    known = set(tm.all_tasks)
    for n in names:
        if n not in known:
            close = difflib.get_close_matches(n, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"unknown lm-eval task {n!r} (not an lm-eval task, group or tag, nor in --include-path){hint}")
    load = getattr(tm, "load", None) or tm.load_task_or_group
    for n in names:
        try:
            load([n])
        except UserError:
            raise
        except Exception as e:  # datasets / hub errors come in many types
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise UserError(f"task {n!r}: cannot load its dataset ({type(e).__name__}: {msg}); {OFFLINE_HINT}") from None


def cmd_lm_eval(args) -> dict:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks: give at least one task name")
    t0 = time.time()
    tm = task_manager(args.include_path, tasks)
    _check_tasks(tm, tasks)  # before the model loads: a typo fails in seconds

    import lm_eval
    from lm_eval.utils import make_table

    from prefixquant_jax.eval.lm_eval import PrefixQuantLM

    loaded = load_for_eval(args.model, DTYPES[args.dtype], args.import_prefix, args.backend, args.fake_matmul,
                           args.kernels)
    lm = PrefixQuantLM(pretrained=args.model, backend=args.backend, fake_matmul=args.fake_matmul, dtype=args.dtype,
                       kernels=args.kernels, batch_size=args.batch_size, max_length=args.max_length, loaded=loaded)
    limit = None if args.limit is None else (args.limit if args.limit < 1 else int(args.limit))
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, num_fewshot=args.num_fewshot,
                                  bootstrap_iters=args.bootstrap_iters, log_samples=False, random_seed=args.seed,
                                  numpy_random_seed=args.seed, torch_random_seed=args.seed,
                                  fewshot_random_seed=args.seed)
    print(make_table(out))
    if out.get("groups"):
        print(make_table(out, "groups"))
    res = {"model": args.model, "recipe": lm.loaded.name, "backend": args.backend, "fake_matmul": args.fake_matmul,
           "kernels": args.kernels, "dtype": args.dtype, "tasks": tasks, "limit": limit,
           "num_fewshot": args.num_fewshot,
           "batch_size": args.batch_size, "max_length": lm.max_length, "prefix_len": lm.P,
           "results": out["results"], "groups": out.get("groups", {}), "n-samples": out.get("n-samples", {}),
           "versions": out.get("versions", {}), "lm_eval_version": getattr(lm_eval, "__version__", None),
           "seconds": time.time() - t0}
    return res


HANDLERS = {"lm-eval": cmd_lm_eval}
