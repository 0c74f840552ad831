"""Several processes (`quantize --coordinator HOST:PORT --num-processes N --process-id I`): jax.distributed.

`initialize` calls `jax.distributed.initialize` before any JAX computation (the CLI does it right after parsing),
with gloo CPU collectives (`jax_cpu_collectives_implementation`), so that `jax.devices()` lists every process's
devices. The flags may come from the environment instead: JAX_COORDINATOR_ADDRESS (read by JAX itself),
JAX_NUM_PROCESSES and JAX_PROCESS_ID; a cluster JAX detects by itself (SLURM, Open MPI, ...) needs only
`--coordinator auto`.

What runs where: every process loads the checkpoint and runs the same pipeline (the same seeds, so the same
calibration samples and scales); block-wise training shards each batch over all processes' devices
(pipeline/train.py's `data` mesh over `jax.devices()`), XLA all-reduces the gradients across processes, and
the replicated parameters stay equal everywhere. Process 0 alone writes files (--json, --save, --export-prefix,
--train-dir checkpoints, --eval-log): `is_primary()`.
"""
from __future__ import annotations

import os

from prefixquant_jax.errors import UserError, describe

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}


def _int_env(name: str) -> int | None:
    v = os.environ.get(name)
    if v in (None, ""):
        return None
    try:
        return int(v)
    except ValueError:
        raise UserError(f"{name}={v!r} is not an integer") from None


def settings(coordinator: str | None = None, num_processes: int | None = None,
             process_id: int | None = None) -> dict | None:
    """The checked (coordinator, num_processes, process_id) of the flags, else of the environment; None when
    neither asks for several processes."""
    coordinator = coordinator or os.environ.get(ENV["coordinator"]) or None
    num_processes = num_processes if num_processes is not None else _int_env(ENV["num_processes"])
    process_id = process_id if process_id is not None else _int_env(ENV["process_id"])
    if coordinator is None and num_processes is None and process_id is None:
        return None
    if coordinator is None:
        raise UserError("--num-processes / --process-id need --coordinator HOST:PORT (or JAX_COORDINATOR_ADDRESS)")
    if coordinator == "auto":  # JAX's cluster auto-detection fills in what is missing
        return {"coordinator": None, "num_processes": num_processes, "process_id": process_id}
    host, colon, port = coordinator.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--coordinator {coordinator!r}: expected HOST:PORT (e.g. 127.0.0.1:12345) or auto")
    if num_processes is None or process_id is None:
        raise UserError("--coordinator needs --num-processes N and --process-id I (or JAX_NUM_PROCESSES, "
                        "JAX_PROCESS_ID)")
    if num_processes < 1:
        raise UserError(f"--num-processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise UserError(f"--process-id must be in 0..{num_processes - 1}, got {process_id}")
    return {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               timeout_s: int = 120) -> bool:
    """jax.distributed.initialize for the given (or environment) settings; False when none are given."""
    s = settings(coordinator, num_processes, process_id)
    if s is None:
        return False
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    try:
        jax.distributed.initialize(coordinator_address=s["coordinator"], num_processes=s["num_processes"],
                                   process_id=s["process_id"], initialization_timeout=timeout_s)
    except Exception as e:  # RuntimeError / XlaRuntimeError / ValueError from the coordination service
        raise UserError(f"jax.distributed.initialize failed ({describe(e)})") from None
    return True


def is_primary() -> bool:
    """True in process 0 (and in a single-process run): the one that writes files."""
    import jax

    return jax.process_index() == 0


def is_several() -> bool:
    import jax

    return jax.process_count() > 1
