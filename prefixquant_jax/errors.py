"""Errors meant for the user: one line, naming the file, option or layer at fault.

Library code raises `UserError` (a `ValueError`); the CLI prints `error: <message>` and exits with status 2.
Anything else that escapes is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A problem with the user's input (path, option, file contents), not a bug.

    `fields`: the options the message names, as written in it (e.g. "QuantizeOptions.eta"), so that a front
    end can say them its own way (the CLI puts its flag names in their place)."""

    def __init__(self, message: str, *fields: str):
        # keep it one line: the CLI prints str(self) as is
        super().__init__(" ".join(str(message).split()))
        self.fields = fields


def describe(exc: BaseException) -> str:
    """`Type: first line of the message` (at most 200 characters), for wrapping library errors."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__
