"""The one rule for quoting a library's exception in a one-line message."""

from __future__ import annotations


def first_line(e: BaseException, limit: int | None = 200, *, cause: bool = False) -> str:
    """The first line of ``e`` (of the error that caused it, with ``cause``), at most ``limit`` characters (None: all);
    its type's name when it has no text."""
    if cause:
        e = e.__cause__ or e
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
