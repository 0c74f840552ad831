"""Every write is safe ([R]): each writer of the command line, into a full file system and into a read-only
directory, ends with one line `error: cannot write PATH: <reason>` and a non-zero exit; what was at the target
before is untouched; nothing half-written is left that a later command would take for a complete file or model.

The full and read-only file systems are small tmpfs mounts made by the test, so these tests need root (and a
kernel that allows the mount); elsewhere they are skipped. `prefixquant_jax/files.py` is the one place writes go
through; its own behaviour (temporary names, the kept previous version) is tested without a mount below."""
import json
import os
import pathlib
import subprocess

import pytest

from prefixquant_jax import files
from prefixquant_jax.errors import UserError
from tests.cli.util import assert_one_line_error, main_cli


def _mount(path: pathlib.Path, *opts) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=512k",) + opts), "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


@pytest.fixture
def full_fs(tmp_path):
    """A tmpfs with no space left (a filler file takes it all), unmounted after the test."""
    mnt = tmp_path / "full"
    if os.geteuid() != 0 or not _mount(mnt):
        pytest.skip("needs root to mount a tmpfs")
    with open(mnt / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def ro_fs(tmp_path):
    """A read-only tmpfs (one file in it, written before it became read-only)."""
    mnt = tmp_path / "ro"
    if os.geteuid() != 0 or not _mount(mnt):
        pytest.skip("needs root to mount a tmpfs")
    (mnt / "kept.json").write_text('{"kept": true}\n')
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="module")
def saved(tiny_quantized, tmp_path_factory, tiny_dir):
    """A saved quantized tiny model with a prefix (for export-prefix and eval)."""
    import prefixquant_jax as pq
    from prefixquant_jax.checkpoint.fp import load_checkpoint

    d = tmp_path_factory.mktemp("saved") / "q"
    pq.save(tiny_quantized("w4a4kv4-dynamic"), str(d), tokenizer=load_checkpoint(tiny_dir).tokenizer())
    return str(d)


QUANT = ("--preset", "w4a4kv4-dynamic", "--prefix-ids", "1", "--calib-samples", "2", "--calib-seqlen", "16",
         "--grid-samples", "1", "--no-fp", "--seqlen", "16", "--max-windows", "1")


def writers(tiny_dir, text_file, saved, target):
    """(name, argv, the path written) of every writer, each writing into directory `target`."""
    t = pathlib.Path(target)
    q = ["quantize", "--model", tiny_dir, "--calib-data", text_file, "--eval-data", text_file, *QUANT]
    return [
        ("json", ["eval", "--model", saved, "--data", text_file, "--seqlen", "16", "--max-windows", "1",
                  "--json", str(t / "r.json")], t / "r.json"),
        ("eval-log", ["eval", "--model", saved, "--data", text_file, "--seqlen", "16", "--max-windows", "1",
                      "--eval-log", str(t / "e.jsonl")], t / "e.jsonl"),
        ("plot", ["analyze", "--model", tiny_dir, "--calib-data", text_file, "--calib-seqlen", "16",
                  "--outlier-samples", "2", "--no-rotate", "--plot", str(t / "p.png")], t / "p.png"),
        ("save", [*q, "--no-eval", "--save", str(t / "model")], t / "model"),
        ("export-prefix-flag", [*q, "--no-eval", "--export-prefix", str(t / "p.safetensors")], t / "p.safetensors"),
        ("train-dir", [*q, "--no-eval", "--train", "--train-samples", "2", "--train-seqlen", "16", "--epochs", "1",
                       "--train-batch-size", "2", "--train-dir", str(t / "run")], t / "run"),
        ("export-hf", ["export-hf", "--model", tiny_dir, "--out", str(t / "hf")], t / "hf"),
        ("export-prefix", ["export-prefix", "--model", saved, "--out", str(t / "x.safetensors")], t / "x.safetensors"),
    ]


NAMES = ["json", "eval-log", "plot", "save", "export-prefix-flag", "train-dir", "export-hf", "export-prefix"]


def _check(res, target: pathlib.Path, where: pathlib.Path, reason: str):
    assert_one_line_error(res, "cannot write")
    line = [l for l in res.stderr.splitlines() if l.startswith("error:")][0]
    assert str(where) in line and reason.lower() in line.lower(), line
    if target.name == "run" and target.is_dir():  # a training directory is filled as the run goes: no train.json,
        assert not (target / "train.json").exists()  # so --resume says it is not one
    else:
        assert not target.exists()  # nothing half-written at the target
    assert not files.leftovers(str(target))  # and no temporary file left beside it


@pytest.mark.parametrize("name", NAMES)
def test_full_disk(name, full_fs, tiny_dir, text_file, saved, capsys):
    _, argv, target = next(w for w in writers(tiny_dir, text_file, saved, full_fs) if w[0] == name)
    _check(main_cli(capsys, *argv), target, full_fs, "No space left on device")


@pytest.mark.parametrize("name", NAMES)
def test_read_only_directory(name, ro_fs, tiny_dir, text_file, saved, capsys):
    _, argv, target = next(w for w in writers(tiny_dir, text_file, saved, ro_fs) if w[0] == name)
    res = main_cli(capsys, *argv)
    # refused while parsing (the target's directory is not writable) or when writing: one line either way
    assert_one_line_error(res, "")
    line = [l for l in res.stderr.splitlines() if l.startswith("error:")][0]
    assert "writ" in line.lower() and str(ro_fs) in line, line
    assert not target.exists()
    assert json.loads((ro_fs / "kept.json").read_text()) == {"kept": True}


def test_full_disk_keeps_what_was_there(tmp_path, tiny_dir, text_file, saved, capsys):
    """An existing --json file stays as it was when the new one cannot be written."""
    mnt = tmp_path / "full2"
    if os.geteuid() != 0 or not _mount(mnt):
        pytest.skip("needs root to mount a tmpfs")
    try:
        out = mnt / "kept.json"
        out.write_text('{"old": 1}\n')
        with open(mnt / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        res = main_cli(capsys, "eval", "--model", saved, "--data", text_file, "--seqlen", "16", "--max-windows", "1",
                       "--json", str(out))
        assert_one_line_error(res, "cannot write")
        assert json.loads(out.read_text()) == {"old": 1} and not files.leftovers(str(out))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# ---- files.py itself (no mount needed)
def test_atomic_file_replaces_only_when_complete(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_file(str(p)) as tmp:
            pathlib.Path(tmp).write_text("half")
            raise RuntimeError("killed")
    assert p.read_text() == "old" and not files.leftovers(str(p))
    with files.atomic_file(str(p)) as tmp:
        pathlib.Path(tmp).write_text("new")
    assert p.read_text() == "new"


def test_a_killed_replacement_gives_the_previous_directory_back(tmp_path):
    """A run killed after moving the old directory aside and before putting the new one in place: the next write
    (or check) of the target puts the old one back first; a leftover temporary directory is removed."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "v").write_text("1")
    prev = tmp_path / f"{files.TMP}model-previous"
    os.rename(d, prev)  # what the killed run left
    (tmp_path / f"{files.TMP}model-abc").mkdir()  # and its half-written new version
    assert files.recover(str(d)) and (d / "v").read_text() == "1"
    assert files.leftovers(str(d)) == [str(tmp_path / f"{files.TMP}model-abc")]
    with files.atomic_dir(str(d)) as tmp:
        pathlib.Path(tmp, "v").write_text("2")
    assert (d / "v").read_text() == "2" and not files.leftovers(str(d)) and not prev.exists()


def test_cannot_write_is_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match=r"cannot write .*file/out.json: .* not a directory"):
        files.write_json(str(f / "out.json"), {})
