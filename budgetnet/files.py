"""Writing files so that a crash never leaves one half-written, and user-given names kept inside the
folder they belong in: the one home of those rules."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

_UMASK = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it) ...
os.umask(_UMASK)  # ... and put back at once
FILE_MODE = 0o666 & ~_UMASK  # what open() would give a new file: mkstemp's files are owner-only (0600)


def write_atomic(path: str | os.PathLike, write) -> Path:
    """Call ``write(binary_file)`` on a temporary file in ``path``'s folder (created if missing), flush it to
    disk, then rename it over ``path``: readers see the old file or the whole new one, never a part. The
    file gets the mode a plain ``open`` would give it under the process's umask.
    Returns ``path``; on any error the temporary file is removed and the error raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), FILE_MODE)  # a shared report or data folder stays readable to others
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


MAX_NAME = 80  # characters of a folder name made from a user's name, its hash included
_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_UNSAFE_RUN = re.compile(r"(?:[^A-Za-z0-9._-]|\.{2,})+")  # separators, "..", NUL, spaces, non-ASCII
_HASHED = re.compile(r"-[0-9a-f]{8}$")  # what a changed name ends in; a name already ending so is changed too


class UnsafePath(ValueError):
    """A path made from a user-given name would leave the folder it belongs in (a user mistake)."""


def safe_name(name: str) -> str:
    """``name`` as one folder name: ASCII letters, digits, ``.``, ``_`` and ``-``, no leading dot or dash,
    no ``..``, at most ``MAX_NAME`` characters. A name that already is one is returned as it is; any other
    gets its unsafe runs replaced by ``_`` and ``-`` plus 8 hex digits of its SHA-256 appended, so that two
    different names never share a folder (``a/b`` is not ``a_b``)."""
    if len(name) <= MAX_NAME and _SAFE.fullmatch(name) and ".." not in name and not _HASHED.search(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    stem = _UNSAFE_RUN.sub("_", name).lstrip(".-")[:MAX_NAME - 9] or "_"
    return f"{stem}-{digest}"


def inside(base: str | os.PathLike, *parts: str | os.PathLike) -> Path:
    """``base/parts...`` resolved (symlinks followed), or ``UnsafePath`` when that leaves ``base``: the guard
    every writer of a path made from a user-given name goes through. ``base`` itself need not exist."""
    root = Path(base).resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise UnsafePath(f"{Path(base).joinpath(*parts)} leads outside {base} (to {path}); give a plain name")
    return path
