"""The one colour per region index, shared by every picture of regions (``spatext inspect``, ``spatext sample``'s
scene image and training grids, the eval report's scene column), so region i looks the same in all of them."""

from __future__ import annotations

# Distinct colours on dark and light backgrounds (Sasha Trubetskoy's list of 20 distinct colours, first 12).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
)


def region_colour(index: int) -> tuple[int, int, int]:
    """The colour of region ``index`` (1-based, as in segment maps and scenes; cycles after 12)."""
    return PALETTE[(index - 1) % len(PALETTE)]
