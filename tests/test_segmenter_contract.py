"""Every available segmentation backend returns the same structure on the same image; detectron2's adapter."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from spatext.pipeline.records import Sample, Segment, Segmentation
from spatext.pipeline.segmenters import SegmenterSpec, available_segmenters, create_segmenter
from spatext.pipeline.segmenters.base import weights_label
from spatext.pipeline.segmenters.detectron2_backend import INSTALL_HINT, panoptic_to_segmentation

HAS_DETECTRON2 = importlib.util.find_spec("detectron2") is not None


def _sample() -> Sample:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    id_map = np.zeros((96, 128), np.int32)
    id_map[:48] = 3
    id_map[48:, 64:] = 5
    truth = Segmentation(id_map, (Segment(3, "sky"), Segment(5, "grass")))
    return Sample("k", "s", "a caption", image, annotation=truth)


def _spec(name: str) -> SegmenterSpec:
    """A spec each backend can run offline: random weights get all-zero thresholds, or they find nothing."""
    if name == "mask2former":
        return SegmenterSpec(name, weights="none", config="mask2former-tiny", threshold=0.0, mask_threshold=0.0,
                             overlap_threshold=0.0, processor_size=96)
    if name == "detectron2":
        return SegmenterSpec(name, weights="none", threshold=0.0, overlap_threshold=0.0, processor_size=96)
    return SegmenterSpec(name)


@pytest.mark.parametrize("name", available_segmenters())
def test_every_backend_returns_the_same_structure(name):
    if name == "detectron2" and not HAS_DETECTRON2:
        pytest.skip("detectron2 is not importable here (not on PyPI); its adapter is tested below without it")
    sample = _sample()
    segmenter = create_segmenter(_spec(name))
    (result,) = segmenter.segment([sample])
    assert isinstance(result, Segmentation)
    assert result.id_map.dtype == np.int32 and result.id_map.shape == sample.image.shape[:2]
    present = {int(i) for i in np.unique(result.id_map) if i > 0}
    assert present == {s.id for s in result.segments} and present
    assert all(isinstance(s.label, str) for s in result.segments)
    assert all(s.score is None or isinstance(s.score, float) for s in result.segments)
    assert isinstance(segmenter.weights_label, str) and segmenter.weights_label == weights_label(_spec(name))


def test_detectron2_output_conversion():
    panoptic = np.array([[0, 1, 1], [2, 2, 7]], dtype=np.int32)  # 7 has no segment info: becomes void
    info = [
        {"id": 1, "isthing": True, "category_id": 0, "score": 0.9},
        {"id": 2, "isthing": False, "category_id": 1, "area": 2},
        {"id": 4, "isthing": True, "category_id": 1, "score": 0.5},  # absent from the map: dropped
    ]
    seg = panoptic_to_segmentation(panoptic, info, ["person", "dog"], ["things", "sky"])
    assert seg.id_map.tolist() == [[0, 1, 1], [2, 2, 0]]
    assert seg.segments == (Segment(1, "person", 0.9), Segment(2, "sky", None))


@pytest.mark.skipif(HAS_DETECTRON2, reason="detectron2 is installed here")
def test_missing_detectron2_says_how_to_install_it():
    with pytest.raises(ImportError) as err:
        create_segmenter(SegmenterSpec("detectron2"))
    assert str(err.value) == INSTALL_HINT and "git+https://github.com/facebookresearch/detectron2" in INSTALL_HINT


def test_weights_labels():
    assert weights_label(SegmenterSpec("annotations")) == "ground truth"
    assert weights_label(SegmenterSpec("mask2former")) == "facebook/mask2former-swin-large-coco-panoptic"
    assert weights_label(SegmenterSpec("mask2former", weights="none")) == "none (random init)"
    assert weights_label(SegmenterSpec("detectron2", weights="/w/model.pkl")) == "/w/model.pkl"


@pytest.mark.parametrize("high", [50, 5_931_152])  # small ids (bincount) and COCO-panoptic-sized ids (unique)
def test_present_ids_matches_numpy_unique(high):
    from spatext.pipeline.segmenters.base import present_ids

    ids = np.random.default_rng(high).integers(0, high, (40, 50)).astype(np.int32)
    ids[ids % 7 == 0] = 0
    expected = np.unique(ids)
    np.testing.assert_array_equal(present_ids(ids), expected[expected > 0])
    assert present_ids(np.zeros((0, 3), np.int32)).size == 0
