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
