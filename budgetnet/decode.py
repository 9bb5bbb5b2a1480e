"""Decoding one image file into a small uint8 array: Pillow and numpy only, no torch.

It lives apart from ``budgetnet.folder`` (which imports torch through ``budgetnet.data``) so that the
decoding processes ``folder.decode_images`` starts from a fork server import just this: a fresh worker
is up in a fraction of a second instead of paying torch's ~1.5 s import.
"""

from __future__ import annotations

import numpy as np

GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def decode_image(path: str, size: int) -> np.ndarray | None:
    """One image as uint8 H x W (grayscale) or H x W x 3, its shorter side resized to ``size`` and
    centre-cropped to size x size; None if Pillow cannot read it."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            mode = "L" if im.mode in GRAY_MODES else "RGB"
            im.draft(mode, (size, size))  # JPEG only: decode at a reduced scale still >= size
            out = ImageOps.fit(im.convert(mode), (size, size), Image.Resampling.BICUBIC)
            return np.asarray(out, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):  # corrupt, truncated, unknown
        return None


def decode_chunk(paths: list[str], size: int) -> list[np.ndarray | None]:
    """``decode_image`` over a chunk of paths (one task of a worker process: fewer round trips)."""
    return [decode_image(p, size) for p in paths]
