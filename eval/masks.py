"""Input masks for evaluation: index-map checks and the mask perturbations of ``--mask-perturb``.

An *index map* is what the shards' ``segment_map`` and a benchmark's ``masks/KEY.png`` hold: an H x W uint8 array,
0 = unconditioned, i = region i. Perturbations model inaccurate user masks (mask sensitivity):

- ``erode:PX``  every region shrinks by PX pixels (Euclidean disk). The image frame is not a boundary: a region
  touching the frame stays touching it. A region thinner than 2·PX can vanish (it is then absent from the result).
- ``dilate:PX`` every region grows by PX pixels (Euclidean) into *unconditioned* pixels only: a dilated region never
  overwrites another region's pixels. A 0 pixel within PX of several regions goes to the nearest one (ties: the one
  ``scipy.ndimage.distance_transform_edt`` finds first).
- ``coarse:PX`` blocky masks: the map is cut into PX x PX blocks aligned to the top-left corner (partial blocks at the
  right and bottom edges) and each block takes its majority label (0 included; ties: the lowest label), i.e.
  downsampling by PX with a majority vote, then nearest upsampling. Regions smaller than about a block can vanish.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from spatext.pipeline.segmenters.base import present_ids

PERTURBATIONS = ("erode", "dilate", "coarse")
PERTURB_FLAG = "--mask-perturb"
PERTURB_FORMS = "erode:PX, dilate:PX or coarse:PX (PX an integer >= 1)"


@dataclass(frozen=True)
class MaskPerturbation:
    """One parsed ``--mask-perturb`` value: the kind and its size in pixels."""

    kind: str  # one of PERTURBATIONS
    pixels: int  # >= 1

    def __post_init__(self) -> None:
        """Reject kinds and sizes that no perturbation uses."""
        if self.kind not in PERTURBATIONS or isinstance(self.pixels, bool) or int(self.pixels) < 1:
            raise ValueError(f"{PERTURB_FLAG}: invalid {self.kind}:{self.pixels}; valid forms: {PERTURB_FORMS}")

    def __str__(self) -> str:
        """The flag form, e.g. ``erode:4``."""
        return f"{self.kind}:{self.pixels}"


def parse_perturb(spec: str) -> MaskPerturbation:
    """Parse ``erode:PX`` / ``dilate:PX`` / ``coarse:PX``; a ValueError names the flag and the valid forms."""
    kind, sep, value = str(spec).strip().partition(":")
    if not sep or kind not in PERTURBATIONS or not value.isdigit() or int(value) < 1:
        raise ValueError(f"{PERTURB_FLAG} {spec!r} is not valid; valid forms: {PERTURB_FORMS}")
    return MaskPerturbation(kind, int(value))


def check_index_map(index_map: np.ndarray, shape: tuple[int, ...] | None = None, name: str = "masks") -> None:
    """Raise a ValueError unless ``index_map`` is an H x W uint8 array (of ``shape``, when given)."""
    if not isinstance(index_map, np.ndarray) or index_map.ndim != 2 or index_map.dtype != np.uint8:
        got = f"{index_map.shape} {index_map.dtype}" if isinstance(index_map, np.ndarray) else type(index_map).__name__
        raise ValueError(f"{name} must be an H x W uint8 index map (0 = unconditioned, i = region i), got {got}")
    if shape is not None and index_map.shape != tuple(shape):
        raise ValueError(f"{name} has shape {index_map.shape}, the image has {tuple(shape)}; resize the masks first")


def region_indices(index_map: np.ndarray) -> list[int]:
    """The region indices present in an index map (non-zero values), ascending (the segmenters' ``present_ids``)."""
    return [int(i) for i in present_ids(np.asarray(index_map))]


def erode(index_map: np.ndarray, pixels: int) -> np.ndarray:
    """Shrink every region by ``pixels`` (Euclidean); the image frame does not erode (see the module docstring)."""
    out = np.zeros_like(index_map)
    for index in region_indices(index_map):
        region = index_map == index
        if region.all():
            out[region] = index
            continue
        # Distance from each region pixel to the nearest non-region pixel inside the image; > pixels survives.
        out[ndimage.distance_transform_edt(region) > pixels] = index
    return out


def dilate(index_map: np.ndarray, pixels: int) -> np.ndarray:
    """Grow every region by ``pixels`` into unconditioned pixels only; the nearest region wins a contested pixel."""
    free = index_map == 0
    if free.all() or not free.any():
        return index_map.copy()
    # For each free pixel: the distance to, and the coordinates of, the nearest region pixel.
    distance, (rows, cols) = ndimage.distance_transform_edt(free, return_indices=True)
    grow = free & (distance <= pixels)
    out = index_map.copy()
    out[grow] = index_map[rows[grow], cols[grow]]
    return out


def coarsen(index_map: np.ndarray, pixels: int) -> np.ndarray:
    """Majority label per ``pixels`` x ``pixels`` block, painted back over the block (see the module docstring)."""
    height, width = index_map.shape
    labels, dense = np.unique(index_map, return_inverse=True)
    dense = dense.reshape(height, width)
    block = (np.arange(height)[:, None] // pixels) * (-(-width // pixels)) + np.arange(width)[None, :] // pixels
    counts = np.bincount((block * len(labels) + dense).ravel(), minlength=(block.max() + 1) * len(labels))
    winner = counts.reshape(-1, len(labels)).argmax(axis=1)  # ties -> the first, i.e. the lowest label
    return labels[winner[block]].astype(np.uint8)


def perturb_masks(index_map: np.ndarray, spec: str | MaskPerturbation) -> np.ndarray:
    """Return a perturbed copy of an index map per ``spec`` (``erode:PX``, ``dilate:PX`` or ``coarse:PX``)."""
    perturbation = spec if isinstance(spec, MaskPerturbation) else parse_perturb(spec)
    check_index_map(index_map)
    if perturbation.kind == "erode":
        return erode(index_map, perturbation.pixels)
    if perturbation.kind == "dilate":
        return dilate(index_map, perturbation.pixels)
    return coarsen(index_map, perturbation.pixels)
