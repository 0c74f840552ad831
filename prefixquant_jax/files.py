"""Every file and directory this package writes goes through here: written under a temporary name beside the
target and renamed when complete, so that a kill, a full disk or a read-only target never leaves a half-written
file that a later command would take for a complete one, and never touches what the user had at the target
before the new one is whole. An OSError (no space left, permission denied, read-only file system, a path that is
a file) becomes one line `cannot write PATH: <reason>` (a UserError).

Temporary names start with `.tmp-` and the target's name; `leftovers(path)` lists those a killed run left
behind (a later write of the same target removes them). Replacing a directory moves the old one aside as
`.tmp-NAME-previous` until the new one is in place: a run killed in between leaves it there, and `recover(path)`
(called before every directory write) puts it back, so the user's model is never lost."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile

from prefixquant_jax.errors import UserError

TMP = ".tmp-"


def cannot_write(path: str, e: OSError) -> UserError:
    reason = e.strerror or str(e) or type(e).__name__
    return UserError(f"cannot write {os.path.abspath(path)}: {reason}")


def _previous(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f"{TMP}{os.path.basename(path)}-previous")


def leftovers(path: str) -> list[str]:
    """Temporary files or directories a killed write of `path` left beside it (not the previous version)."""
    path = os.path.abspath(path)
    found = glob.glob(os.path.join(os.path.dirname(path), glob.escape(TMP + os.path.basename(path)) + "-*"))
    return sorted(p for p in found if p != _previous(path))


def recover(path: str) -> bool:
    """Put back the previous version of directory `path` that a killed replacement left aside; True if it did."""
    prev = _previous(path)
    if os.path.lexists(path) or not os.path.isdir(prev):
        return False
    with writing(path):
        os.rename(prev, os.path.abspath(path))
    return True


def _clear_leftovers(path: str) -> None:
    for p in leftovers(path):
        shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else _unlink(p)


def _unlink(p: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(p)


def _parent(path: str) -> str:
    """The target's directory, made if it is missing; UserError when a file stands where a directory must be."""
    parent = os.path.dirname(os.path.abspath(path))
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"cannot write {os.path.abspath(path)}: {existing} is not a directory")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise cannot_write(path, e) from None
    return parent


@contextlib.contextmanager
def writing(path: str):
    """OSError inside the block -> UserError `cannot write PATH: reason`."""
    try:
        yield
    except OSError as e:
        raise cannot_write(path, e) from None


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a temporary file name beside `path`; when the block ends without error it becomes `path` (whatever was
    there is replaced only then); on any error it is removed and `path` is left as it was."""
    if os.path.isdir(path):
        raise UserError(f"cannot write {os.path.abspath(path)}: it is a directory")
    parent = _parent(path)
    _clear_leftovers(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP}{os.path.basename(path)}-", dir=parent)
        os.close(fd)
    except OSError as e:
        raise cannot_write(path, e) from None
    try:
        with writing(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        _unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield a temporary directory beside `path`; when the block ends without error it becomes `path` (an existing
    `path` is swapped out only then, and removed after); on any error it is removed and `path` is left as it was."""
    path = os.path.abspath(path)
    parent = _parent(path)
    recover(path)
    _clear_leftovers(path)
    try:
        tmp = tempfile.mkdtemp(prefix=f"{TMP}{os.path.basename(path)}-", dir=parent)
    except OSError as e:
        raise cannot_write(path, e) from None
    try:
        with writing(path):
            yield tmp
            if os.path.lexists(path):
                old = _previous(path)
                if os.path.lexists(old):
                    shutil.rmtree(old)
                os.rename(path, old)
                try:
                    os.rename(tmp, path)
                except BaseException:
                    os.rename(old, path)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str, obj) -> None:
    """`obj` as indented JSON at `path`, atomically."""
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=float)
            f.write("\n")
