"""ST: label-map downsampling that keeps small segments, and the gather that paints embeddings into it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spatext.model.st import build_st, downsample_label_map, label_coverage


def _majority_reference(label_map: np.ndarray, size: tuple[int, int], num_labels: int) -> np.ndarray:
    """Brute force: each output cell takes the most frequent label of its pixels, lowest label on ties."""
    height, width = label_map.shape
    out = np.zeros(size, dtype=np.int64)
    for cy in range(size[0]):
        for cx in range(size[1]):
            counts = np.zeros(num_labels, dtype=np.int64)
            for y in range(height):
                for x in range(width):
                    if y * size[0] // height == cy and x * size[1] // width == cx:
                        counts[label_map[y, x]] += 1
            out[cy, cx] = int(np.argmax(counts))
    return out


@pytest.mark.parametrize("shape,size", [((12, 12), (4, 4)), ((13, 10), (5, 3)), ((16, 8), (4, 8))])
def test_majority_matches_brute_force(shape, size):
    rng = np.random.default_rng(0)
    maps = rng.integers(0, 4, (3, *shape))
    maps[0, : shape[0] // 2] = 0  # some structure and plenty of ties
    got = downsample_label_map(torch.from_numpy(maps), size, num_segments=3, min_cells=float("inf"))
    assert got.shape == (3, *size) and got.dtype == torch.int64
    for b in range(3):
        np.testing.assert_array_equal(got[b].numpy(), _majority_reference(maps[b], size, 4))


def test_coverage_counts_every_pixel_once():
    rng = np.random.default_rng(1)
    maps = torch.from_numpy(rng.integers(0, 5, (2, 20, 14)))
    cov = label_coverage(maps, (6, 4), 5)
    assert cov.shape == (2, 5, 24)
    assert cov.sum().item() == maps.numel()
    for label in range(5):
        assert cov[:, label].sum().item() == int((maps == label).sum())


def _square(label_map: torch.Tensor, label: int, y: int, x: int, side: int) -> None:
    label_map[0, y : y + side, x : x + side] = label


def test_tiny_segment_survives_where_majority_loses_it():
    label_map = torch.zeros(1, 256, 256, dtype=torch.long)
    _square(label_map, 1, 36, 36, 9)  # 81 px >= one 8x8 cell, but split 4/5 x 4/5 over four cells: no majority
    _square(label_map, 2, 100, 100, 3)  # 9 px < one cell: may vanish (documented)
    label_map[0, 150:240, 10:200] = 3  # large
    majority = downsample_label_map(label_map, (32, 32), min_cells=float("inf"))
    assert not (majority == 1).any()  # the test is meaningful: plain majority erases it
    out = downsample_label_map(label_map, (32, 32))
    assert (out == 1).sum() == 1  # round(81 / 64) = 1 cell, at its highest-coverage cell
    assert out[0, 5, 5] == 1  # covers rows/cols 40..47 with 5 x 5 = 25 px, the most of the four cells
    assert not (out == 2).any()  # sub-cell segments may vanish; this one does
    assert (out == 3).sum() == (majority == 3).sum()  # the large segment is untouched


def test_many_tiny_segments_and_a_thin_line_all_survive():
    rng = np.random.default_rng(2)
    label_map = torch.zeros(1, 256, 256, dtype=torch.long)
    label_map[0, 50:52, 20:220] = 1  # 2 px wide line: 25% of each cell it crosses, 400 px = 6.25 cells
    for label in range(2, 22):  # 20 squares of 8..12 px at random unaligned spots on a 5 x 4 grid (no overlap)
        gy, gx = divmod(label - 2, 4)
        side = int(rng.integers(8, 13))
        _square(label_map, label, 70 + gy * 36 + int(rng.integers(0, 20)), gx * 60 + int(rng.integers(0, 40)), side)
    out = downsample_label_map(label_map, (32, 32), num_segments=21)
    for label in range(1, 22):
        pixels = int((label_map == label).sum())
        cells = int((out == label).sum())
        assert cells >= 1, f"segment {label} ({pixels} px) vanished"
        assert cells <= max(1, round(pixels / 64)) + 1  # rescue never inflates a small segment
    assert int((out == 1).sum()) == 6


def test_rescue_never_takes_a_segments_last_cell():
    label_map = torch.zeros(1, 16, 16, dtype=torch.long)  # cells of 4 x 4 at size 4 x 4
    label_map[0, 0:4, 0:3] = 1  # 12 px: the majority of cell (0, 0)
    label_map[0, 0:4, 3:4] = 2  # 4 px in cell (0, 0) ...
    label_map[0, 4:5, 0:4] = 2  # ... and 4 px in cell (1, 0): 8 px but no majority anywhere (threshold 0.5 cells)
    out = downsample_label_map(label_map, (4, 4), min_cells=0.5)
    assert out[0, 0, 0] == 1  # segment 1's only cell is protected
    assert out[0, 1, 0] == 2  # segment 2 gets its other cell
    assert int((out == 2).sum()) == 1


def test_large_segments_keep_their_area():
    yy, xx = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    label_map = torch.zeros(2, 256, 256, dtype=torch.long)
    label_map[0][(yy - 100) ** 2 + (xx - 120) ** 2 < 70**2] = 1
    label_map[0][(yy - 200) ** 2 + (xx - 60) ** 2 < 30**2] = 2
    label_map[1][yy + xx < 200] = 1
    label_map[1][(yy > 180) & (xx > 40)] = 2
    out = downsample_label_map(label_map, (32, 32))
    for b in range(2):
        for label in (1, 2):
            before = float((label_map[b] == label).float().mean())
            after = float((out[b] == label).float().mean())
            assert abs(after - before) < 0.02 * max(before, 0.1) + 0.005


def test_same_size_and_upsampling_keep_every_label():
    rng = np.random.default_rng(3)
    maps = torch.from_numpy(rng.integers(0, 6, (2, 8, 12)))
    assert torch.equal(downsample_label_map(maps, (8, 12)), maps)
    up = downsample_label_map(maps, (20, 30))
    assert up.shape == (2, 20, 30)
    for b in range(2):
        assert set(up[b].unique().tolist()) == set(maps[b].unique().tolist())
    mixed = downsample_label_map(maps, (16, 6))  # one axis up, one down
    assert mixed.shape == (2, 16, 6)


def test_labels_above_num_segments_are_an_error():
    label_map = torch.zeros(1, 16, 16, dtype=torch.long)
    label_map[0, :4, :4] = 5
    with pytest.raises(ValueError, match="num_segments"):
        downsample_label_map(label_map, (4, 4), num_segments=3)


def _st_reference(label_map: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    batch, height, width = label_map.shape
    out = torch.zeros(batch, embeddings.shape[2], height, width, dtype=embeddings.dtype)
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                label = int(label_map[b, y, x])
                if label:
                    out[b, :, y, x] = embeddings[b, label - 1]
    return out


def test_build_st_matches_a_loop():
    rng = np.random.default_rng(4)
    label_map = torch.from_numpy(rng.integers(0, 4, (2, 9, 7)))
    embeddings = torch.randn(2, 5, 6)  # K = 5 rows; labels use 1..3, rows 4..5 are padding
    st = build_st(label_map, embeddings)
    assert st.shape == (2, 6, 9, 7)
    torch.testing.assert_close(st, _st_reference(label_map, embeddings), rtol=0, atol=0)


def test_build_st_with_size_uses_the_segment_keeping_downsample():
    label_map = torch.zeros(1, 256, 256, dtype=torch.long)
    _square(label_map, 1, 36, 36, 9)
    label_map[0, 150:240, 10:200] = 2
    embeddings = torch.randn(1, 3, 4)
    st = build_st(label_map, embeddings, (32, 32))
    reduced = downsample_label_map(label_map, (32, 32), 3)
    torch.testing.assert_close(st, _st_reference(reduced, embeddings), rtol=0, atol=0)
    assert (st.abs().sum(1) > 0).sum() == (reduced > 0).sum()
    torch.testing.assert_close(st[0, :, 5, 5], embeddings[0, 0])  # the tiny segment is painted


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_build_st_keeps_device_and_dtype(dtype):
    label_map = torch.zeros(2, 64, 64, dtype=torch.long, device="meta")
    embeddings = torch.empty(2, 3, 16, dtype=dtype, device="meta")
    st = build_st(label_map, embeddings)  # runs without real memory: no dense CPU tensor anywhere
    assert st.device.type == "meta" and st.dtype == dtype and st.shape == (2, 16, 64, 64)
    real = build_st(torch.zeros(2, 8, 8, dtype=torch.long), torch.ones(2, 3, 4, dtype=dtype))
    assert real.dtype == dtype and not real.any()


def test_build_st_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="batch"):
        build_st(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(3, 2, 8))


def test_labels_above_the_segment_count_are_an_error_on_the_cpu():
    with pytest.raises(ValueError, match="label_map holds labels > num_segments=3"):  # was an index error
        build_st(torch.full((1, 4, 4), 9), torch.zeros(1, 3, 5))
    assert build_st(torch.full((1, 4, 4), 3), torch.ones(1, 3, 5)).sum() == 16 * 5
