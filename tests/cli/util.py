"""Running the `prefixquant` CLI from tests: in this process (`main_cli`, the default: no interpreter start-up,
no re-import of JAX), or in a subprocess (`run_cli`: several processes, other device counts, the console
script), and the check every CLI error test makes (`assert_one_line_error`)."""
import os
import subprocess
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main_cli(capsys, *args):
    """`prefixquant ARGS` in this process: SimpleNamespace(returncode, stdout, stderr), as run_cli returns.
    An argparse error (SystemExit) gives its exit status; any other exception propagates (a traceback is a bug)."""
    from prefixquant_jax.cli.main import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return types.SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)


def run_cli(*args, timeout=300, devices=None, script=False):
    """`prefixquant ARGS` in a subprocess; devices=N: on N CPU devices (XLA_FLAGS set, or removed for 1);
    script=True: the installed console script `prefixquant`, else `python -m prefixquant_jax.cli.main`."""
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    if devices is not None:
        env["JAX_PLATFORMS"] = "cpu"
        env.pop("XLA_FLAGS", None)
        if devices > 1:
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    cmd = [console_script()] if script else [sys.executable, "-m", "prefixquant_jax.cli.main"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def console_script() -> str:
    """The `prefixquant` entry point installed beside this interpreter (pyproject's [project.scripts])."""
    return os.path.join(os.path.dirname(sys.executable), "prefixquant")


def assert_one_line_error(r, pattern):
    """Exit status 2, exactly one line `error: ...` containing `pattern` (case-insensitive), no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, r.stderr[-2000:]
    assert pattern.lower() in lines[0].lower(), lines[0]
