"""The segment crop: the one home of "segment -> square image" for CLIP (used by the embed stage and Local distance).

DESIGN.md: crop the tightest square around the segment's mask (clamped to the image; pad if the square leaves the
image), black out pixels outside the mask, then apply the CLIP model's own image transform. ``segment_crop`` (a PIL
image) and ``segment_crop_array`` (a uint8 array) do everything but the transform, which belongs to the model (see
``spatext.pipeline.clip``).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Return the tight bounding box (x0, y0, x1, y1), exclusive ends, of a non-empty H x W boolean mask."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be H x W, got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        raise ValueError("mask is empty: a segment needs at least one pixel")
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _square_start(lo: int, hi: int, side: int, size: int) -> int:
    """Start of a ``side``-long window centred on [lo, hi), clamped to [0, size) or, if longer, covering all of it."""
    start = lo - (side - (hi - lo)) // 2
    # side <= size: stay inside the image; side > size: cover the whole axis (the rest is padding).
    return int(np.clip(start, min(0, size - side), max(0, size - side)))


def _square_box(mask: np.ndarray) -> tuple[int, int, int]:
    """Return (x0, y0, side) of the crop square for a mask; the square may extend past the image only to pad."""
    x0, y0, x1, y1 = mask_bbox(mask)
    side = max(x1 - x0, y1 - y0)
    height, width = mask.shape
    return _square_start(x0, x1, side, width), _square_start(y0, y1, side, height), side


def segment_crop(image: np.ndarray, mask: np.ndarray) -> Image.Image:
    """Return the square RGB crop around ``mask`` with pixels outside the mask (and any padding) black."""
    return Image.fromarray(segment_crop_array(image, mask))


def segment_crop_array(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``segment_crop`` as a side x side x 3 uint8 array (what the tensor CLIP transform takes)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H x W x 3 uint8, got shape {image.shape} dtype {image.dtype}")
    if mask.shape != image.shape[:2] or mask.dtype != np.bool_:
        raise ValueError(f"mask must be a bool array of shape {image.shape[:2]}, got {mask.shape} {mask.dtype}")
    sx, sy, side = _square_box(mask)
    height, width = mask.shape
    # The part of the square that lies inside the image, in image and in square coordinates.
    ix0, iy0, ix1, iy1 = max(sx, 0), max(sy, 0), min(sx + side, width), min(sy + side, height)
    out = np.zeros((side, side, 3), dtype=np.uint8)
    window = image[iy0:iy1, ix0:ix1] * mask[iy0:iy1, ix0:ix1, None]
    out[iy0 - sy : iy1 - sy, ix0 - sx : ix1 - sx] = window
    return out
