"""The batched panoptic merge against its independent reference, transformers' own panoptic post-processing.

Equality is exact: the same id map (same ids, since both number segments in query order), the same segments in the
same order with the same label ids and the same 6-place-rounded scores. Random logits cover: thresholds of 0 (every
query survives and all of them overlap), typical thresholds (0.8 / 0.5 / 0.8), images in between; batches mixing
target sizes; tiny target sizes (where won / original area ratios land exactly on the overlap threshold); images
where no query survives (-1 maps) and where queries survive but none becomes a segment (0 maps).
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from transformers import Mask2FormerImageProcessor
from transformers.models.mask2former import image_processing_mask2former as reference_module

from spatext.pipeline.segmenters.panoptic_merge import (
    PanopticResult,
    PanopticSegment,
    _count_true,
    _first_argmax,
    panoptic_merge,
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


def test_equals_reference_in_bfloat16(processor) -> None:
    """Logits of a bf16 forward: the merge keeps the reference's dtype rules (the segmenter upcasts before it)."""
    class_logits, mask_logits = _logits(5)
    class_logits, mask_logits = class_logits.bfloat16(), mask_logits.bfloat16()
    for thresholds in THRESHOLDS:
        sizes = [(64, 80), (64, 80), (31, 47)]
        reference = _reference(processor, class_logits, mask_logits, sizes, thresholds)
        _assert_same(reference, panoptic_merge(class_logits, mask_logits, sizes, *thresholds))


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
