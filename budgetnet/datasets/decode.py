"""Decoding one image file into a small uint8 array: Pillow and numpy only, no torch.

Apart from ``datasets.folder`` so that its fork-server decoding processes start without importing torch.
"""

from __future__ import annotations

import numpy as np

GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
DEEP_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})  # more than 8 bits a pixel


def _to_8bit(im):
    """A 16-bit, 32-bit or float grayscale image as mode L, scaled, not clipped as Pillow's convert("L")
    would. 16-bit modes by their depth; 32-bit integers and floats by the range their values use (8 bits,
    16 bits or [0, 1] as such, anything else from its minimum to its maximum)."""
    from PIL import Image

    a = np.asarray(im, dtype=np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if im.mode.startswith("I;16") or (im.mode == "I" and 0 <= lo and 255 < hi <= 65535):
        a = a / 257.0
    elif im.mode == "F" and 0 <= lo and hi <= 1:
        a = a * 255.0
    elif lo < 0 or hi > 255:
        a = (a - lo) * (255.0 / (hi - lo))
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def decode_image(path: str, size: int) -> np.ndarray | None:
    """One image as uint8 H x W (grayscale) or H x W x 3, turned upright by its EXIF orientation (a
    phone's photo), its shorter side resized to ``size`` and centre-cropped to size x size; None if
    Pillow cannot read it."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            mode = "L" if im.mode in GRAY_MODES else "RGB"
            im.draft(mode, (size, size))  # JPEG only: decode at a reduced scale still >= size
            upright = ImageOps.exif_transpose(im)
            flat = _to_8bit(upright) if upright.mode in DEEP_MODES else upright.convert(mode)
            out = ImageOps.fit(flat, (size, size), Image.Resampling.BICUBIC)
            return np.asarray(out, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):  # corrupt, truncated, unknown
        return None


def decode_chunk(paths: list[str], size: int) -> list[np.ndarray | None]:
    """``decode_image`` over a chunk of paths (one task of a worker process: fewer round trips)."""
    return [decode_image(p, size) for p in paths]
