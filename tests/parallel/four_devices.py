"""Subprocesses of the parallel tests: JAX reads XLA_FLAGS=--xla_force_host_platform_device_count=N once, at start,
so a test that needs N CPU devices (or several processes) runs that part in a fresh process.

run_worker: a test module's `worker(*args, out)` on 4 devices, which writes OUT.json and OUT.npz (write_results).
cli_process: the `prefixquant` command line (cli.main) in a fresh process on N devices."""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def device_env(devices: int | None = None) -> dict:
    """The environment of a CPU subprocess with `devices` host devices (None or 1: XLA_FLAGS removed)."""
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if devices is not None and devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def run_worker(module: str, args: tuple, out: str, timeout: int) -> tuple[dict, dict]:
    """(the worker's JSON, its arrays) after `from module import worker; worker(*args, out)` on 4 devices."""
    code = f"from {module} import worker; worker(*{(*args, out)!r})"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=device_env(4), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out + ".json") as f:
        res = json.load(f)
    arrays = dict(np.load(out + ".npz")) if os.path.exists(out + ".npz") else {}
    return res, arrays


def write_results(out: str, res: dict, arrays: dict) -> None:
    """The worker's side of run_worker: OUT.npz (arrays) and OUT.json (res)."""
    np.savez(out + ".npz", **arrays)
    with open(out + ".json", "w") as f:
        json.dump(res, f)


def cli_command(*args) -> list[str]:
    """argv of `prefixquant ARGS` in a fresh interpreter."""
    return [sys.executable, "-m", "prefixquant_jax.cli.main", *map(str, args)]


def cli_process(*args, devices: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """`prefixquant ARGS` in a subprocess on `devices` CPU devices."""
    return subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout, env=device_env(devices),
                          cwd=ROOT)
