"""A killed command can be run again ([R]): `quantize --save` killed (SIGKILL) at each point of its save, then the
same command: it succeeds and the model loads; a replacement killed between moving the old model aside and putting
the new one in place loses nothing (the next command puts the old one back first). Each run is a subprocess (the
kill ends the process); the kill points are set by patching the library in that process."""
import os
import signal
import subprocess
import sys

import pytest

from prefixquant_jax import files
from tests.cli.util import ROOT, assert_one_line_error, main_cli

KILLER = """
import os, signal, sys
point = os.environ["KILL_AT"]
import prefixquant_jax.checkpoint.saved as saved
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "state":  # the Orbax state written, the metadata not yet, nothing renamed
    real_state = saved._write_state
    def write_state(*a):
        real_state(*a)
        kill()
    saved._write_state = write_state
elif point in ("rename", "swap"):  # before the first rename (new in place), or before the second (old moved aside)
    real_rename, calls, target = os.rename, [], sys.argv[sys.argv.index("--save") + 1]
    def rename(a, b):
        if str(a) == target or os.path.basename(str(a)).startswith(".tmp-" + os.path.basename(target)):
            calls.append(a)  # ours, not Orbax's own renames inside its state directory
            if (point == "rename" and len(calls) == 1) or (point == "swap" and len(calls) == 2):
                kill()
        real_rename(a, b)
    os.rename = rename
from prefixquant_jax.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def save_cmd(tiny_dir, target, *more):
    # weight-only W4 with the data-free clip: no calibration, a quick run that still saves int4 codes
    return ["quantize", "--model", tiny_dir, "--preset", "fp", "--w-bits", "4", "--weight-clip", "mse", "--no-eval",
            "--save", str(target), *more]


def killed(point, argv):
    env = dict(os.environ, PYTHONPATH=ROOT, KILL_AT=point)
    r = subprocess.run([sys.executable, "-c", KILLER, *argv], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])


# "state" (killed after the Orbax state, before the metadata) is slow-only: by default the same point is covered in
# process by tests/checkpoint/test_saved.py::test_interrupted_save_leaves_nothing (an exception right there)
@pytest.mark.parametrize("point", [pytest.param("state", marks=pytest.mark.slow), "rename"])
def test_killed_save_then_the_same_command(point, tiny_dir, tmp_path, capsys):
    target = tmp_path / "model"
    killed(point, save_cmd(tiny_dir, target))
    assert not target.exists() and files.leftovers(str(target))  # the half-written model is only a temp dir
    if point == "state":  # no metadata yet: loading it says it is incomplete
        res = main_cli(capsys, "eval", "--model", str(files.leftovers(str(target))[0]), "--max-windows", "1")
        assert_one_line_error(res, "not a prefixquant checkpoint")
    assert main_cli(capsys, *save_cmd(tiny_dir, target)).returncode == 0
    assert not files.leftovers(str(target))
    import prefixquant_jax as pq
    assert pq.load(str(target)).recipe.name == "fp"


def test_killed_replacement_loses_nothing(tiny_dir, tmp_path, capsys):
    target = tmp_path / "model"
    assert main_cli(capsys, *save_cmd(tiny_dir, target)).returncode == 0
    before = sorted(os.listdir(target))
    killed("swap", save_cmd(tiny_dir, target, "--overwrite"))
    assert not target.exists()  # the old model is aside, the new one not yet in place
    # the same command without --overwrite: the old model is put back, and kept
    assert_one_line_error(main_cli(capsys, *save_cmd(tiny_dir, target)), "--overwrite")
    assert sorted(os.listdir(target)) == before
    # with --overwrite (the killed command itself): it succeeds
    assert main_cli(capsys, *save_cmd(tiny_dir, target, "--overwrite")).returncode == 0
    assert not files.leftovers(str(target))
