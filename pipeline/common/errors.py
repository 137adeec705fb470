"""The one exception type for problems a user can fix, and how an exception reads in one line."""
from __future__ import annotations


class UserError(Exception):
    """Bad input or setup: printed as one line by the entry scripts, never as a traceback."""


def first_line(err: BaseException, *, last: bool = False) -> str:
    """The first (or last) non-empty line of an exception's message, else its type name."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return lines[-1] if last else lines[0]
