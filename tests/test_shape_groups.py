"""Forward passes of similar shapes (pipeline/segmenters/shape_groups.py): the processed shape against transformers'
own processor, the cut against a brute force over every cut of the aspect-ratio order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from transformers import Mask2FormerImageProcessor

from spatext.pipeline.segmenters.shape_groups import MIN_PASS_PIXELS, processed_shape, shape_groups, shape_step


@pytest.mark.parametrize(("shortest", "longest"), [(128, 213), (512, 853), (800, 1333)])
def test_processed_shape_is_the_processors_own(shortest: int, longest: int) -> None:
    processor = Mask2FormerImageProcessor(size={"shortest_edge": shortest, "longest_edge": longest})
    rng = np.random.default_rng(0)
    sizes = [(512, 512), (512, 232), (232, 512), (391, 512), (512, 17), (33, 480), (100, 150), (1000, 333)]
    sizes += [tuple(int(v) for v in rng.integers(16, 700, 2)) for _ in range(12)]
    for height, width in sizes:
        image = np.zeros((height, width, 3), np.uint8)
        pixels = processor(images=[image], return_tensors="pt", input_data_format="channels_last")["pixel_values"]
        assert processed_shape(height, width, shortest, longest, processor.size_divisor) == tuple(pixels.shape[-2:])


def _cost(shapes, groups, floor):
    return sum(max(floor, len(g) * max(shapes[i][0] for i in g) * max(shapes[i][1] for i in g)) for g in groups)


def test_shape_groups_is_the_cheapest_cut_of_the_aspect_order() -> None:
    rng = np.random.default_rng(1)
    for trial in range(60):
        n = int(rng.integers(1, 9))
        shapes = [tuple(int(v) * 32 for v in rng.integers(4, 28, 2)) for _ in range(n)]
        floor = float(rng.choice([0, 128 * 128, 512 * 512, 4 * 512 * 512]))
        groups = shape_groups(shapes, floor)
        assert sorted(i for g in groups for i in g) == list(range(n))  # each index once
        assert all(g == sorted(g) for g in groups) and groups == sorted(groups)
        order = sorted(range(n), key=lambda i: (shapes[i][0] / shapes[i][1], i))
        best = min(
            _cost(shapes, [order[a:b] for a, b in itertools.pairwise((0, *cuts, n))], floor)
            for k in range(n) for cuts in itertools.combinations(range(1, n), k)
        )
        assert _cost(shapes, groups, floor) == pytest.approx(best), trial


def test_shape_groups_extremes() -> None:
    mixed = [(512, 768), (768, 512), (512, 640), (512, 768), (704, 512)]
    assert shape_groups(mixed, min_pass_pixels=1e12) == [[0, 1, 2, 3, 4]]  # any pass costs the floor: one pass
    free = shape_groups(mixed, min_pass_pixels=0)  # no floor: no padding at all
    assert all(len({mixed[i] for i in g}) == 1 for g in free)
    assert _cost(mixed, free, 0) == sum(h * w for h, w in mixed)
    assert shape_groups(mixed, min_pass_pixels=512 * 512) == [[0, 3], [1], [2], [4]]  # each pass past the floor
    assert shape_groups(mixed, min_pass_pixels=3 * 512 * 512) == [[0, 2, 3], [1, 4]]  # landscape and portrait apart
    assert shape_groups([(512, 512)] * 4, min_pass_pixels=0) == [[0, 1, 2, 3]]  # ties: fewer passes
    assert shape_groups([], min_pass_pixels=1.0) == []
    with pytest.raises(ValueError, match="min_pass_pixels"):
        shape_groups(mixed, min_pass_pixels=-1)


def test_the_default_floor_keeps_small_batches_whole_and_splits_large_mixed_ones() -> None:
    landscape, portrait = processed_shape(384, 512, 512, 853), processed_shape(512, 300, 512, 853)
    assert shape_groups([landscape, portrait] * 2, MIN_PASS_PIXELS) == [list(range(4))]
    groups = shape_groups([landscape, portrait] * 12, MIN_PASS_PIXELS)
    assert groups == [list(range(0, 24, 2)), list(range(1, 24, 2))]


def test_shape_step_is_a_quarter_edge_on_the_processors_grid() -> None:
    assert shape_step(512) == 128 and shape_step(800) == 192 and shape_step(1024) == 256
    assert shape_step(128) == 32 and shape_step(64) == 32  # never below the processor's divisor: no change there
    assert shape_step(512, divisor=1) == 128 and shape_step(800, divisor=1) == 200 and shape_step(0, 32) == 32
    for shortest in range(64, 1400, 37):
        assert shape_step(shortest) % 32 == 0 and abs(shape_step(shortest) - shortest / 4) <= 16


def test_the_step_grid_bounds_the_shapes_passes_run() -> None:
    """The reason for the grid: demo-like batches of 16 (sides 256-512 px, 1:2.5 to 2.5:1) run far fewer distinct
    pass shapes on the 128 px grid than on the processor's 32 px one, for a few per cent more pixels."""
    rng = np.random.default_rng(0)

    def passes(step: int) -> tuple[set, float]:
        seen, pixels = set(), 0.0
        for _ in range(300):
            sizes = rng.integers(256, 513, (16, 2))
            shapes = [processed_shape(int(h), int(w), 512, 853, step) for h, w in sizes]
            for group in shape_groups(shapes, MIN_PASS_PIXELS):
                shape = (len(group), max(shapes[i][0] for i in group), max(shapes[i][1] for i in group))
                seen.add(shape)
                pixels += max(MIN_PASS_PIXELS, shape[0] * shape[1] * shape[2])
        return seen, pixels

    fine, fine_pixels = passes(32)
    coarse, coarse_pixels = passes(shape_step(512))
    assert all(h % 128 == 0 and w % 128 == 0 for _, h, w in coarse)
    assert len(coarse) < len(fine) / 2 and coarse_pixels < 1.1 * fine_pixels
