"""Writing files so that a crash never leaves one half-written: the one home of that rule."""

from __future__ import annotations

import os
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
