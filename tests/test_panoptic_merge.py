"""The batched panoptic merge against its independent reference, transformers' own panoptic post-processing.

Equality is exact: the same id map (same ids, since both number segments in query order), the same segments in the
same order with the same label ids and the same 6-place-rounded scores. Random logits cover: thresholds of 0 (every
query survives and all of them overlap), typical thresholds (0.8 / 0.5 / 0.8), images in between; batches mixing
target sizes; tiny target sizes (where won / original area ratios land exactly on the overlap threshold); images
where no query survives (-1 maps) and where queries survive but none becomes a segment (0 maps).

With ``image_fractions`` (batch padding cut off first, which the reference does not do), the reference is transformers'
post-processing of each image's own, unpadded logits; the resampling of a fractional extent is checked against
torchvision's ``roi_align``.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from torchvision.ops import roi_align
from transformers import Mask2FormerImageProcessor
from transformers.models.mask2former import image_processing_mask2former as reference_module

from spatext.pipeline.segmenters.panoptic_merge import (
    PanopticResult,
    PanopticSegment,
    _count_true,
    _first_argmax,
    _to_reference_grid,
    panoptic_merge,
    valid_fractions,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

THRESHOLDS = [  # (score, mask, overlap)
    (0.0, 0.0, 0.0),  # everything survives: what the tests of random-init models use
    (0.8, 0.5, 0.8),  # the defaults of SegmenterSpec
    (0.3, 0.1, 0.5),
    (0.05, 0.2, 0.75),
]
SIZES = [  # target sizes per image of a batch of 3; None = the reference's 384 x 384
    [(64, 80), (64, 80), (100, 50)],
    [(384, 384), (17, 5), (200, 300)],
    [(5, 5), (4, 5), (5, 4)],
    None,
]


@pytest.fixture(scope="module")
def processor() -> Mask2FormerImageProcessor:
    """The reference implementation's owner (post-processing ignores its size settings)."""
    return Mask2FormerImageProcessor()


def _logits(
    seed: int, batch: int = 3, queries: int = 20, classes: int = 5, hw: tuple[int, int] = (24, 32), boxes: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random class logits (B x Q x C+1) and mask logits (B x Q x h x w); ``boxes`` makes them look like a model's.

    With ``boxes``, half the queries are confident in one class (the "no object" class included), so scores above
    0.8 and dropped queries both occur, and each mask is a noisy random box (logit ~ +5 inside, ~ -5 outside), so
    masks overlap and typical thresholds still yield segments. Without, both are plain Gaussian noise.
    """
    gen = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(batch, queries, classes + 1, generator=gen) * 3
    if not boxes:
        return class_logits, torch.randn(batch, queries, *hw, generator=gen) * 4
    confident = torch.rand(batch, queries, generator=gen) < 0.5
    label = torch.randint(0, classes + 1, (batch, queries, 1), generator=gen)
    class_logits.scatter_add_(2, label, confident[..., None] * torch.full((batch, queries, 1), 8.0))
    height, width = hw
    start = torch.rand(batch, queries, 2, generator=gen) * torch.tensor([height, width])
    extent = torch.rand(batch, queries, 2, generator=gen) * torch.tensor([height, width]) + 1
    inside_y = (torch.arange(height) >= start[..., :1]) & (torch.arange(height) < start[..., :1] + extent[..., :1])
    inside_x = (torch.arange(width) >= start[..., 1:]) & (torch.arange(width) < start[..., 1:] + extent[..., 1:])
    inside = inside_y[..., :, None] & inside_x[..., None, :]
    mask_logits = torch.where(inside, 5.0, -5.0) + torch.randn(batch, queries, height, width, generator=gen) * 2
    return class_logits, mask_logits


def _reference(processor, class_logits, mask_logits, sizes, thresholds) -> list[dict]:
    threshold, mask_threshold, overlap = thresholds
    outputs = SimpleNamespace(class_queries_logits=class_logits, masks_queries_logits=mask_logits)
    return processor.post_process_panoptic_segmentation(
        outputs, threshold=threshold, mask_threshold=mask_threshold, overlap_mask_area_threshold=overlap,
        label_ids_to_fuse=set(), target_sizes=sizes,
    )


def _assert_same(reference: list[dict], ours: list[PanopticResult]) -> None:
    assert len(reference) == len(ours)
    for ref, result in zip(reference, ours, strict=True):
        assert result.id_map.dtype == torch.int32 and result.id_map.device.type == "cpu"
        torch.testing.assert_close(result.id_map, ref["segmentation"].to(torch.int32), rtol=0, atol=0)
        expected = [PanopticSegment(s["id"], s["label_id"], s["score"]) for s in ref["segments_info"]]
        assert list(result.segments) == expected


@pytest.mark.parametrize(("seed", "thresholds", "sizes"), itertools.product(range(3), THRESHOLDS, SIZES))
def test_equals_transformers_reference(processor, seed, thresholds, sizes) -> None:
    class_logits, mask_logits = _logits(seed)
    reference = _reference(processor, class_logits, mask_logits, sizes, thresholds)
    _assert_same(reference, panoptic_merge(class_logits, mask_logits, sizes, *thresholds))


@pytest.mark.parametrize(("seed", "thresholds", "sizes"), itertools.product(range(3), THRESHOLDS, SIZES))
def test_segments_are_exactly_the_positive_ids_of_the_map(seed, thresholds, sizes) -> None:
    """What Mask2FormerSegmenter relies on to skip recounting the ids (``clean_segmentation(present=...)``)."""
    class_logits, mask_logits = _logits(seed)
    results = panoptic_merge(class_logits, mask_logits, target_sizes=sizes, threshold=thresholds[0],
                             mask_threshold=thresholds[1], overlap_threshold=thresholds[2])
    for result in results:
        ids = torch.unique(result.id_map)
        assert sorted(int(i) for i in ids if i > 0) == sorted(s.id for s in result.segments)
        assert int(ids.min()) >= -1 and (int(ids.min()) >= 0 or ids.tolist() == [-1])  # -1 only when nothing kept


@pytest.mark.parametrize("overlap", [0.5, 0.6, 0.75, 0.8])
def test_equals_reference_when_area_ratios_hit_the_threshold(processor, overlap, monkeypatch) -> None:
    """Few noise queries on 3-10 px sides: won / original area is often exactly 1/2, 3/5, 3/4 or 4/5. The reference
    divides in float32 and compares as a Python float, so 3/5 and 4/5 (rounded up in float32) pass > 0.6 and > 0.8,
    while 1/2 and 3/4 (exact in float32) do not pass > 0.5 and > 0.75. A spy on the reference counts such cases."""
    hits = []
    check = reference_module.check_segment_validity

    def spy(mask_labels, mask_probs, k, mask_threshold, overlap_mask_area_threshold):
        won, original = int((mask_labels == k).sum()), int((mask_probs[k] >= mask_threshold).sum())
        if won and original and won / original == overlap_mask_area_threshold:
            hits.append(won / original)
        return check(mask_labels, mask_probs, k, mask_threshold, overlap_mask_area_threshold)

    monkeypatch.setattr(reference_module, "check_segment_validity", spy)
    sizes = [(5, 5), (4, 5), (5, 4), (10, 10), (3, 5), (5, 3)]
    for seed in range(30):
        class_logits, mask_logits = _logits(seed, len(sizes), queries=3, classes=2, hw=(6, 6), boxes=False)
        thresholds = (0.0, 0.2, overlap)
        reference = _reference(processor, class_logits, mask_logits, sizes, thresholds)
        _assert_same(reference, panoptic_merge(class_logits, mask_logits, sizes, *thresholds))
    assert hits, "no area ratio landed on the threshold: the test lost its point"


def test_no_surviving_query_gives_minus_one(processor) -> None:
    class_logits, mask_logits = _logits(0)
    class_logits[1, :, -1] = 50.0  # image 1: every query says "no object"
    class_logits[2] = 0.0  # image 2: uniform scores 1 / 6, below 0.8
    sizes = [(30, 40), (30, 40), (7, 9)]
    ours = panoptic_merge(class_logits, mask_logits, sizes, 0.8, 0.5, 0.8)
    _assert_same(_reference(processor, class_logits, mask_logits, sizes, (0.8, 0.5, 0.8)), ours)
    for result, size in zip(ours[1:], sizes[1:], strict=True):
        assert result.id_map.shape == size and bool((result.id_map == -1).all()) and result.segments == ()
    assert ours[0].segments  # the first image still has segments: mixing both kinds in one batch works


def test_surviving_queries_without_segments_give_zero(processor) -> None:
    class_logits, mask_logits = _logits(1)
    ours = panoptic_merge(class_logits, mask_logits, None, 0.0, 1.0, 0.8)  # weighted probabilities never reach 1
    _assert_same(_reference(processor, class_logits, mask_logits, None, (0.0, 1.0, 0.8)), ours)
    assert all(bool((r.id_map == 0).all()) and r.segments == () for r in ours)


@pytest.mark.parametrize("max_elements", [1, 50 * 64 * 80, 1 << 40])
def test_memory_budget_does_not_change_the_result(max_elements) -> None:
    """Chunks of one image, of some images, or the whole batch at once: the same maps and segments."""
    class_logits, mask_logits = _logits(2, batch=5)
    sizes = [(64, 80)] * 4 + [(20, 20)]
    expected = panoptic_merge(class_logits, mask_logits, sizes, 0.0, 0.0, 0.0, max_elements=1 << 30)
    ours = panoptic_merge(class_logits, mask_logits, sizes, 0.0, 0.0, 0.0, max_elements=max_elements)
    for a, b in zip(expected, ours, strict=True):
        assert torch.equal(a.id_map, b.id_map) and a.segments == b.segments


def test_ids_follow_query_order_and_scores_are_rounded(processor) -> None:
    class_logits, mask_logits = _logits(4)
    (result, *_) = panoptic_merge(class_logits, mask_logits, None, 0.0, 0.0, 0.0)
    ids = [s.id for s in result.segments]
    assert ids == list(range(1, len(ids) + 1))
    assert set(torch.unique(result.id_map).tolist()) - {0} == set(ids)
    assert all(s.score == round(s.score, 6) and 0.0 < s.score <= 1.0 for s in result.segments)


def test_empty_batch() -> None:
    assert panoptic_merge(torch.zeros(0, 4, 3), torch.zeros(0, 4, 8, 8), []) == []


@pytest.mark.parametrize(
    ("class_shape", "mask_shape", "sizes", "match"),
    [
        ((2, 4), (2, 4, 8, 8), None, "class_queries_logits"),
        ((2, 4, 3), (2, 5, 8, 8), None, "masks_queries_logits"),
        ((2, 4, 3), (2, 4, 8, 8), [(8, 8)], "target_sizes"),
        ((2, 4, 3), (2, 4, 8, 8), [(8, 8), (0, 8)], "target_sizes"),
    ],
)
def test_bad_inputs_name_the_argument(class_shape, mask_shape, sizes, match) -> None:
    with pytest.raises(ValueError, match=match):
        panoptic_merge(torch.zeros(class_shape), torch.zeros(mask_shape), sizes)


@pytest.mark.parametrize(
    "fractions", [[(1.0, 1.0)], [(1.5, 1.0), (1.0, 1.0)], [(1.0, 0.0), (1.0, 1.0)], [(1.0,), (1.0, 1.0)]]
)
def test_bad_image_fractions_name_the_argument(fractions) -> None:
    with pytest.raises(ValueError, match="image_fractions"):
        panoptic_merge(torch.zeros(2, 4, 3), torch.zeros(2, 4, 8, 8), None, image_fractions=fractions)


@pytest.mark.parametrize("thresholds", THRESHOLDS)
def test_padding_is_cut_off_before_the_merge(processor, thresholds) -> None:
    """Three images of different sizes in one padded batch (their logits at the top left of a 40 x 56 canvas, loud
    noise elsewhere): each merges to what the reference gives for its own, unpadded logits. The reference run on the
    canvas (the padding stretched onto the image) differs."""
    grids, canvas_size = [(24, 32), (40, 20), (16, 56)], (40, 56)
    gen = torch.Generator().manual_seed(11)
    class_logits = torch.randn(3, 20, 6, generator=gen) * 3
    canvas = torch.randn(3, 20, *canvas_size, generator=gen) * 20
    own = []
    for row, grid in enumerate(grids):
        own.append(_logits(row, batch=1, hw=grid)[1])
        canvas[row, :, : grid[0], : grid[1]] = own[-1][0]
    sizes = [(48, 64), (70, 35), (20, 70)]
    fractions = [(h / canvas_size[0], w / canvas_size[1]) for h, w in grids]
    ours = panoptic_merge(class_logits, canvas, sizes, *thresholds, image_fractions=fractions)
    for row, result in enumerate(ours):
        reference = _reference(processor, class_logits[row : row + 1], own[row], sizes[row : row + 1], thresholds)
        _assert_same(reference, [result])
    if thresholds[0] == 0.0:  # every query survives: the padding's noise would show
        stretched = _reference(processor, class_logits, canvas, sizes, thresholds)
        assert all(not torch.equal(ref["segmentation"].to(torch.int32), result.id_map)
                   for ref, result in zip(stretched, ours, strict=True))


@pytest.mark.parametrize("extent", [(23.25, 31.5), (10.75, 32.0), (24.0, 7.125)])
def test_fractional_extent_resamples_like_roi_align(extent) -> None:
    """An image that ends inside a logit cell: bilinear samples over exactly its extent, as torchvision's roi_align
    (aligned=True, one sample per bin, the box = the extent) takes them from the cells that reach into the image."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 24, 32, generator=gen, dtype=torch.float64)
    ours = _to_reference_grid(logits, extent)
    cells = logits[..., : math.ceil(extent[0]), : math.ceil(extent[1])]
    boxes = [torch.tensor([[0.0, 0.0, extent[1], extent[0]]], dtype=torch.float64)] * 2
    expected = roi_align(cells.flatten(0, 1)[:, None], [b for b in boxes for _ in range(5)], output_size=(384, 384),
                         spatial_scale=1.0, sampling_ratio=1, aligned=True).view(2, 5, 384, 384)
    # roi_align clamps at the cut edge as bilinear resizing does; inside, the sample points are the same
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


def test_valid_fractions_of_processor_pixel_masks(processor) -> None:
    """The processor pads at the bottom and right: its pixel_mask gives each image's share of the padded input."""
    images = [torch.zeros(3, 60, 90, dtype=torch.uint8).numpy(), torch.zeros(3, 120, 40, dtype=torch.uint8).numpy()]
    inputs = Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})(
        images=images, return_tensors="pt", input_data_format="channels_first")
    mask = inputs["pixel_mask"]
    expected = []
    for image_mask in mask:
        rows, cols = image_mask.nonzero().max(0).values + 1
        expected.append((rows.item() / mask.shape[1], cols.item() / mask.shape[2]))
    assert valid_fractions(mask) == expected
    assert max(f for pair in expected for f in pair) == 1.0 and min(f for pair in expected for f in pair) < 1.0


def test_valid_fractions_refuses_other_layouts() -> None:
    mask = torch.zeros(2, 8, 8, dtype=torch.int64)
    mask[0, :4, :6] = 1
    mask[1, 2:, :] = 1  # padding at the top
    with pytest.raises(ValueError, match="pixel_mask of image 1"):
        valid_fractions(mask)
    assert valid_fractions(mask[:1]) == [(0.5, 0.75)]


@pytest.mark.parametrize("slots", [1, 3, 40])
def test_first_argmax_is_argmax_with_ties(slots) -> None:
    """The CPU's amax + where + amin formulation picks argmax's index, the first maximum, also on (many) ties."""
    gen = torch.Generator().manual_seed(slots)
    probs = torch.randint(0, 3, (2, slots, 9, 11), generator=gen).float() / 2  # values 0, 0.5, 1: ties everywhere
    probs[:, :, 0, 0] = -1.0  # padding-like slots only
    torch.testing.assert_close(_first_argmax(probs), probs.argmax(1), rtol=0, atol=0)


@pytest.mark.parametrize("pixels", [(1, 5), (8, 16), (13, 29)])
def test_count_true_counts_every_pixel(pixels) -> None:
    """uint8 block sums (128 pixels a block, then the remainder) equal a plain count, all-True masks included."""
    mask = torch.rand(2, 3, *pixels, generator=torch.Generator().manual_seed(0)) > 0.3
    mask[0, 0] = True
    torch.testing.assert_close(_count_true(mask), mask.sum((2, 3)), rtol=0, atol=0)
