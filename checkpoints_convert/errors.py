"""The converter's one error type: a foreign file or repo it cannot read, named in a one-line message."""


class FormatError(ValueError):
    """A checkpoint, config, prefix file or Hugging Face repo that cannot be read or does not fit (not a bug)."""

    def __init__(self, message: str):
        # one line: a front end prints str(self) as is
        super().__init__(" ".join(str(message).split()))


def describe(exc: BaseException) -> str:
    """`Type: first line of the message` (at most 200 characters), for wrapping library errors."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def cannot_write(path: str, e: BaseException) -> FormatError:
    """`cannot write PATH: reason` for an OSError (full disk, permissions, read-only file system) or what a writer
    library raises for one."""
    reason = getattr(e, "strerror", None) or (str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__)
    return FormatError(f"cannot write {path}: {reason}")
