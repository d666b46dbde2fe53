"""Local IoU (segmenter interface on the image, best match per mask) and the --mask-perturb perturbations."""

from __future__ import annotations

import numpy as np
import pytest

from spatext.eval.local_iou import LocalIoU, local_iou, local_iou_pairs, region_ious, size_batches
from spatext.eval.masks import (
    MaskPerturbation,
    coarsen,
    dilate,
    erode,
    parse_perturb,
    perturb_masks,
    region_indices,
)
from spatext.pipeline.demo_corpus import generate_sample
from spatext.pipeline.records import Sample, Segment, Segmentation
from spatext.pipeline.segmenters.base import SegmenterSpec, create_segmenter


@pytest.fixture(scope="module")
def ground_truth():
    """Demo-corpus images with their exact panoptic annotation and index maps of up to 3 segments >= 5%."""
    images, masks, annotations = [], [], []
    for index in range(6):
        sample = generate_sample(index, seed=3)
        segments = tuple(Segment(int(s["id"]), s["category"]) for s in sample.segments)
        annotations.append(Segmentation(id_map=sample.id_map.astype(np.int32), segments=segments))
        ids, counts = np.unique(sample.id_map, return_counts=True)
        big = [int(i) for i, c in sorted(zip(ids, counts, strict=True), key=lambda t: -t[1]) if c >= 0.05 * ids.size]
        index_map = np.zeros(sample.id_map.shape, dtype=np.uint8)
        for k, seg_id in enumerate(sorted(big[:3]), start=1):
            index_map[sample.id_map == seg_id] = k
        images.append(sample.image)
        masks.append(index_map)
    return images, masks, annotations


@pytest.fixture(scope="module")
def annotations_segmenter():
    """The pipeline's ground-truth segmenter, through the registry."""
    return create_segmenter(SegmenterSpec(name="annotations"))


def shift(index_map: np.ndarray, pixels: int) -> np.ndarray:
    """Move every region right and down by ``pixels`` (zeros enter from the top-left)."""
    out = np.zeros_like(index_map)
    out[pixels:, pixels:] = index_map[: index_map.shape[0] - pixels, : index_map.shape[1] - pixels]
    return out


def test_region_ious_by_hand() -> None:
    masks = np.zeros((4, 6), dtype=np.uint8)
    masks[:, :3], masks[0, 5] = 1, 2
    predicted = np.zeros((4, 6), dtype=np.int32)
    predicted[:, :2], predicted[:, 2:4] = 7, 9  # region 1: IoU 8/12 with 7, 4/16 with 9
    np.testing.assert_allclose(region_ious(masks, predicted), [8 / 12, 0.0])
    np.testing.assert_allclose(region_ious(masks, np.zeros_like(predicted)), [0.0, 0.0])  # nothing predicted
    assert region_ious(np.zeros_like(masks), predicted).size == 0


def test_ground_truth_against_its_own_masks_is_one(ground_truth, annotations_segmenter) -> None:
    images, masks, annotations = ground_truth
    pairs = local_iou_pairs(images, masks, annotations_segmenter, annotations)
    assert len(pairs) == sum(len(region_indices(m)) for m in masks) > len(images)
    np.testing.assert_allclose(pairs.numpy(), 1.0)
    assert float(local_iou(images, masks, annotations_segmenter, annotations)) == 1.0


def test_shifted_masks_score_lower_and_lower(ground_truth, annotations_segmenter) -> None:
    images, masks, annotations = ground_truth
    scores = [
        float(local_iou(images, [shift(m, px) for m in masks], annotations_segmenter, annotations))
        for px in (0, 4, 16, 48)
    ]
    assert scores[0] == 1.0
    assert all(later < earlier for earlier, later in zip(scores, scores[1:], strict=False)), scores


@pytest.mark.parametrize("spec", ["erode:6", "dilate:6", "coarse:24"])
def test_perturbed_masks_score_below_one(ground_truth, annotations_segmenter, spec: str) -> None:
    images, masks, annotations = ground_truth
    perturbed = [perturb_masks(m, spec) for m in masks]
    assert float(local_iou(images, perturbed, annotations_segmenter, annotations)) < 1.0


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # the summed metric itself saw no update
def test_class_equals_functional_and_states_merge(ground_truth, annotations_segmenter) -> None:
    images, masks, annotations = ground_truth
    masks = [shift(m, 8) for m in masks]
    expected = float(local_iou(images, masks, annotations_segmenter, annotations))
    whole, first, second, summed = (LocalIoU(annotations_segmenter, batch_size=2) for _ in range(4))
    whole.update(images, masks, annotations)
    first.update(images[:2], masks[:2], annotations[:2])
    second.update(images[2:], masks[2:], annotations[2:])
    for name, value in first.metric_state.items():  # what a distributed "sum" reduction does
        setattr(summed, name, value + second.metric_state[name])
    first.merge_state(second)
    for metric in (whole, first, summed):
        assert float(metric.compute()) == pytest.approx(expected, abs=1e-12)
    assert whole.higher_is_better is True


def test_mask2former_backend_through_the_same_interface() -> None:
    """A random tiny Mask2Former (threshold 0 so that random queries become segments): shapes and range only."""
    spec = SegmenterSpec(name="mask2former", weights="none", config="mask2former-tiny", threshold=0.0,
                         mask_threshold=0.0, overlap_threshold=0.0, processor_size=64, batch_size=2)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(2)]
    masks = [np.zeros((48, 64), dtype=np.uint8) for _ in range(2)]
    masks[0][5:30, 5:40], masks[1][:, 32:] = 1, 1
    masks[0][30:, 40:] = 2
    segmenter = create_segmenter(spec)
    pairs = local_iou_pairs(images, masks, segmenter)
    assert len(pairs) == 3 and bool(((pairs >= 0) & (pairs <= 1)).all())
    # the same numbers as a brute-force IoU over the maps the backend gives each image alone
    expected = []
    for image, index_map in zip(images, masks, strict=True):
        (seg,) = segmenter.segment([Sample(key="k", source="t", caption="", image=image)])
        for region in (1, 2):
            if (index_map == region).any():
                a = index_map == region
                expected.append(max([(a & (seg.id_map == s)).sum() / (a | (seg.id_map == s)).sum()
                                     for s in np.unique(seg.id_map) if s > 0], default=0.0))
    np.testing.assert_allclose(pairs.numpy(), expected, rtol=0, atol=1e-12)
    assert pairs.max() > 0  # threshold 0: random queries do overlap the regions


def test_mask2former_scores_do_not_depend_on_the_other_images() -> None:
    """Images of two sizes, interleaved: batched (same-size batches) equals one image at a time, exactly; a batch
    mixing the sizes would pad the smaller image and change what the model sees."""
    spec = SegmenterSpec(name="mask2former", weights="none", config="mask2former-tiny", threshold=0.0,
                         mask_threshold=0.0, overlap_threshold=0.0, processor_size=64)
    segmenter = create_segmenter(spec)
    rng = np.random.default_rng(1)
    shapes = [(48, 64), (64, 40), (48, 64), (64, 40), (48, 64)]
    images = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in shapes]
    masks = [np.zeros(shape, dtype=np.uint8) for shape in shapes]
    for mask in masks:
        mask[4:30, 6:30], mask[32:, 20:] = 1, 2
    one_by_one = np.concatenate([local_iou_pairs([im], [m], segmenter).numpy() for im, m in zip(images, masks,
                                                                                                strict=True)])
    np.testing.assert_array_equal(local_iou_pairs(images, masks, segmenter, batch_size=4).numpy(), one_by_one)
    assert size_batches(shapes, 2) == [[0, 2], [4], [1, 3]]


def test_bad_inputs_are_named(ground_truth, annotations_segmenter) -> None:
    images, masks, annotations = ground_truth
    with pytest.raises(ValueError, match=r"masks\[0\].*shape"):
        local_iou(images[:1], [masks[0][1:]], annotations_segmenter, annotations[:1])
    with pytest.raises(ValueError, match=r"masks\[0\].*uint8"):
        local_iou(images[:1], [masks[0].astype(np.int32)], annotations_segmenter, annotations[:1])
    with pytest.raises(ValueError, match="same length"):
        local_iou(images[:2], masks[:1], annotations_segmenter)
    with pytest.raises(ValueError, match="no annotation"):  # the annotations backend needs ground truth
        local_iou(images[:1], masks[:1], annotations_segmenter)


# ------------------------------------------------------------------ mask perturbations (eval/masks.py)


def two_regions() -> np.ndarray:
    """A 40 x 50 map: region 1 a square, region 2 a bar touching the right edge, 0 elsewhere."""
    m = np.zeros((40, 50), dtype=np.uint8)
    m[5:25, 5:25] = 1
    m[10:30, 30:50] = 2
    return m


def test_parse_perturb() -> None:
    assert parse_perturb("erode:3") == MaskPerturbation("erode", 3)
    assert str(parse_perturb(" coarse:16 ")) == "coarse:16"
    for bad in ("erode", "erode:", "erode:-1", "erode:0", "blur:3", "dilate:2.5", ""):
        with pytest.raises(ValueError, match="--mask-perturb.*erode:PX, dilate:PX or coarse:PX"):
            parse_perturb(bad)


def test_erode_shrinks_inside_and_not_at_the_frame() -> None:
    m = two_regions()
    out = erode(m, 2)
    for index in (1, 2):
        assert ((out == index) <= (m == index)).all()  # only removes
    assert (out == 1).sum() == 16 * 16  # the 20 x 20 square loses 2 px on each side
    assert (out[12:28, 48:50] == 2).all()  # region 2 still touches the right frame
    assert 1 not in region_indices(erode(m, 10))  # thinner than 2 * PX: vanishes


def test_dilate_grows_only_into_free_pixels() -> None:
    m = two_regions()
    out = dilate(m, 3)
    assert (out[m != 0] == m[m != 0]).all()  # no region overwrites another
    assert ((out == 1) >= (m == 1)).all() and (out == 1).sum() > (m == 1).sum()
    assert out[5:25, 2].tolist() == [1] * 20 and out[5:25, 1].tolist() == [0] * 20  # exactly 3 px to the left
    gap = out[15, 25:30].tolist()  # 5 free px between the regions: each takes the nearer ones
    assert gap[:2] == [1, 1] and gap[-2:] == [2, 2]
    np.testing.assert_array_equal(dilate(np.zeros((4, 4), np.uint8), 2), 0)


def test_coarse_is_blocky_and_majority_voted() -> None:
    m = two_regions()
    np.testing.assert_array_equal(coarsen(m, 1), m)
    out = coarsen(m, 8)
    for y in range(0, 40, 8):
        for x in range(0, 50, 8):
            block = out[y : y + 8, x : x + 8]
            assert (block == block[0, 0]).all()
            values, counts = np.unique(m[y : y + 8, x : x + 8], return_counts=True)
            assert block[0, 0] == values[counts == counts.max()].min()
    assert out.dtype == np.uint8 and out.shape == m.shape


def test_perturb_masks_dispatch_and_checks() -> None:
    m = two_regions()
    np.testing.assert_array_equal(perturb_masks(m, "dilate:3"), dilate(m, 3))
    np.testing.assert_array_equal(perturb_masks(m, MaskPerturbation("erode", 2)), erode(m, 2))
    with pytest.raises(ValueError, match="uint8 index map"):
        perturb_masks(m.astype(np.int64), "erode:2")


def test_region_indices_match_numpy_unique_for_small_and_huge_ids() -> None:
    """The non-zero values, ascending, as np.unique finds them; an id far beyond uint8 (a raw panoptic id map) no
    longer sizes a bincount by the id (1 << 50 wanted 8 PiB: MemoryError)."""
    rng = np.random.default_rng(0)
    for m in (rng.integers(0, 256, (30, 40)).astype(np.uint8), two_regions(), np.zeros((4, 4), np.uint8)):
        want = np.unique(m)
        assert region_indices(m) == [int(i) for i in want[want > 0]]
        assert all(type(i) is int for i in region_indices(m))
    huge = np.array([[0, 1 << 50], [3, 3]], dtype=np.int64)
    assert region_indices(huge) == [3, 1 << 50]


def test_a_bad_batch_size_is_refused_at_construction(annotations_segmenter) -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        LocalIoU(annotations_segmenter, batch_size=0)
