"""Run a test module's `worker(*args, out)` in a subprocess that sees 4 CPU devices (XLA_FLAGS is read once per
process, so the mesh tests cannot get them in the pytest process). The worker writes OUT.json and OUT.npz."""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_worker(module: str, args: tuple, out: str, timeout: int) -> tuple[dict, dict]:
    """(the worker's JSON, its arrays) after `from module import worker; worker(*args, out)` on 4 devices."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    code = f"from {module} import worker; worker(*{(*args, out)!r})"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out + ".json") as f:
        res = json.load(f)
    return res, dict(np.load(out + ".npz"))


def write_results(out: str, res: dict, arrays: dict) -> None:
    """The worker's side of run_worker: OUT.npz (arrays) and OUT.json (res)."""
    np.savez(out + ".npz", **arrays)
    with open(out + ".json", "w") as f:
        json.dump(res, f)
