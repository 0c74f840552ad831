"""Errors meant for the user: one line, naming the file, flag or layer at fault.

Library code raises `UserError`; the CLI prints `error: <message>` and exits with status 2.
Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (path, flag, file contents), not a bug."""

    def __init__(self, message: str):
        # keep it one line: the CLI prints str(self) as is
        super().__init__(" ".join(str(message).split()))


def describe(exc: BaseException) -> str:
    """`Type: first line of the message` (at most 200 characters), for wrapping library errors."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__
