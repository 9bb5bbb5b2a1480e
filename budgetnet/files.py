"""Writing files so that a crash never leaves one half-written: the one home of that rule."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike, write) -> Path:
    """Call ``write(binary_file)`` on a temporary file in ``path``'s folder (created if missing), flush it to
    disk, then rename it over ``path``: readers see the old file or the whole new one, never a part.
    Returns ``path``; on any error the temporary file is removed and the error raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
