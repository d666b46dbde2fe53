"""segment_crop / labeled_crop_array / mask_bbox against an independent brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from spatext.pipeline.crop import labeled_crop_array, mask_bbox, segment_crop


def _reference_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box by scanning every pixel."""
    ys, xs = [], []
    for y in range(mask.shape[0]):
        for x in range(mask.shape[1]):
            if mask[y, x]:
                ys.append(y)
                xs.append(x)
    return min(xs), min(ys), max(xs) + 1, max(ys) + 1


def _reference_start(lo: int, hi: int, side: int, size: int) -> int:
    """Search every window start that contains [lo, hi): least padding, then most centred, then the later one."""
    candidates = range(hi - side, lo + 1)
    return min(candidates, key=lambda s: (max(0, -s) + max(0, s + side - size), abs(2 * s + side - lo - hi), -s))


def _reference_crop(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Loop over output pixels, map each to its source pixel, copy it if it is inside the image and the mask."""
    x0, y0, x1, y1 = _reference_bbox(mask)
    side = max(x1 - x0, y1 - y0)
    sx = _reference_start(x0, x1, side, mask.shape[1])
    sy = _reference_start(y0, y1, side, mask.shape[0])
    out = np.zeros((side, side, 3), dtype=np.uint8)
    for oy in range(side):
        for ox in range(side):
            y, x = sy + oy, sx + ox
            if 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and mask[y, x]:
                out[oy, ox] = image[y, x]
    return out


def _blob(rng: np.random.Generator, height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A random mask inside box (x0, y0, x1, y1) that touches all four sides of the box."""
    x0, y0, x1, y1 = box
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < 0.5
    for y, x in ((y0, rng.integers(x0, x1)), (y1 - 1, rng.integers(x0, x1))):
        mask[y, x] = True
    for y, x in ((rng.integers(y0, y1), x0), (rng.integers(y0, y1), x1 - 1)):
        mask[y, x] = True
    return mask


def _random_box(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
    x0, x1 = sorted(rng.choice(width + 1, size=2, replace=False))
    y0, y1 = sorted(rng.choice(height + 1, size=2, replace=False))
    return int(x0), int(y0), int(x1), int(y1)


CASES = {
    "random": [(h, w, None) for h, w in [(17, 23), (32, 32), (9, 40), (40, 9), (1, 1), (5, 1)]],
    "touches_left_top": [(20, 30, (0, 0, 7, 4)), (30, 20, (0, 0, 3, 11))],
    "touches_right_bottom": [(20, 30, (25, 12, 30, 20)), (30, 20, (8, 22, 20, 30))],
    "tall_on_wide_image": [(16, 48, (40, 0, 44, 16)), (16, 48, (0, 2, 3, 15))],
    "wide_on_tall_image": [(48, 16, (0, 40, 16, 44)), (48, 16, (1, 0, 15, 3))],
    "bigger_than_short_side": [(12, 40, (2, 1, 35, 11)), (40, 12, (1, 3, 11, 37)), (10, 30, (0, 0, 30, 10))],
    "single_pixel": [(10, 10, (0, 0, 1, 1)), (10, 10, (9, 9, 10, 10)), (7, 13, (6, 3, 7, 4))],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_segment_crop_matches_brute_force(case: str) -> None:
    rng = np.random.default_rng(sorted(CASES).index(case))
    for height, width, box in CASES[case] * 5:
        box = box or _random_box(rng, height, width)
        image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        mask = _blob(rng, height, width, box)
        assert mask_bbox(mask) == _reference_bbox(mask) == box
        crop = segment_crop(image, mask)
        assert crop.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(crop), _reference_crop(image, mask))


def test_fully_random_masks() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        height, width = rng.integers(1, 30, size=2)
        image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        mask = rng.random((height, width)) < rng.uniform(0.01, 0.9)
        if not mask.any():
            continue
        assert mask_bbox(mask) == _reference_bbox(mask)
        np.testing.assert_array_equal(np.asarray(segment_crop(image, mask)), _reference_crop(image, mask))


def test_square_stays_inside_image_when_it_fits() -> None:
    image = np.full((20, 40, 3), 200, dtype=np.uint8)
    mask = np.zeros((20, 40), dtype=bool)
    mask[0:2, 0:12] = True  # 12 wide, 2 tall at the top-left corner: the square is shifted down, not padded
    crop = np.asarray(segment_crop(image, mask))
    assert crop.shape == (12, 12, 3)
    assert (crop[0:2] == 200).all() and (crop[2:] == 0).all()


def test_full_image_mask_on_non_square_image_pads() -> None:
    image = np.full((6, 10, 3), 7, dtype=np.uint8)
    crop = np.asarray(segment_crop(image, np.ones((6, 10), dtype=bool)))
    assert crop.shape == (10, 10, 3)  # centred on the segment: two padding rows above, two below
    assert (crop[2:8] == 7).all() and (crop[:2] == 0).all() and (crop[8:] == 0).all()


def test_empty_mask_raises() -> None:
    with pytest.raises(ValueError, match="empty"):
        segment_crop(np.zeros((4, 4, 3), dtype=np.uint8), np.zeros((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="empty"):
        mask_bbox(np.zeros((4, 4), dtype=bool))


@pytest.mark.parametrize(
    ("image", "mask"),
    [
        (np.zeros((4, 4, 3), dtype=np.uint8), np.ones((4, 5), dtype=bool)),
        (np.zeros((4, 4, 3), dtype=np.uint8), np.ones((4, 4), dtype=np.uint8)),
        (np.zeros((4, 4), dtype=np.uint8), np.ones((4, 4), dtype=bool)),
        (np.zeros((4, 4, 3), dtype=np.float32), np.ones((4, 4), dtype=bool)),
    ],
)
def test_bad_inputs_raise(image: np.ndarray, mask: np.ndarray) -> None:
    with pytest.raises(ValueError, match="must be"):
        segment_crop(image, mask)


def test_labeled_crop_matches_brute_force_for_every_segment_of_a_label_map() -> None:
    rng = np.random.default_rng(5)
    for _ in range(60):
        height, width = (int(v) for v in rng.integers(1, 40, size=2))
        image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        labels = np.zeros((height, width), dtype=np.uint8)
        for index in range(1, int(rng.integers(2, 6))):  # later boxes overwrite parts of earlier ones
            x0, y0, x1, y1 = _random_box(rng, height, width) if min(height, width) > 1 else (0, 0, width, height)
            labels[y0:y1, x0:x1] = np.where(rng.random((y1 - y0, x1 - x0)) < 0.7, index, labels[y0:y1, x0:x1])
        for index in np.unique(labels[labels > 0]):
            mask = labels == index
            crop = labeled_crop_array(image, labels, int(index), _reference_bbox(mask))
            np.testing.assert_array_equal(crop, _reference_crop(image, mask))


def test_labeled_crop_rejects_bad_boxes() -> None:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    labels = np.zeros((8, 8), dtype=np.uint8)
    labels[2:4, 2:4] = 1
    with pytest.raises(ValueError, match="no pixel inside its bbox"):
        labeled_crop_array(image, labels, 1, (5, 5, 8, 8))  # a stale box
    for box in [(3, 3, 3, 5), (0, 0, 9, 4), (-1, 0, 3, 3)]:
        with pytest.raises(ValueError, match="not a non-empty box"):
            labeled_crop_array(image, labels, 1, box)
    with pytest.raises(ValueError, match="label map must be H x W"):
        labeled_crop_array(image, labels[:7], 1, (2, 2, 4, 4))
