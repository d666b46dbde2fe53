"""Model sharing across processes (--model-sharing machine): the stages' handlers talk to their model only through
method calls, so Beam's cross-process model proxy gives the same outputs as the local model."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from apache_beam.utils import multi_process_shared

from spatext.pipeline.clip import TINY_MODEL, ClipEmbedder, ClipSpec, load_clip
from spatext.pipeline.config import BuildConfig
from spatext.pipeline.crop import mask_bbox
from spatext.pipeline.records import Sample, Segment, Segmentation, SelectedSegment
from spatext.pipeline.segment import SegmenterModelHandler
from spatext.pipeline.segmenters.base import SegmenterSpec, create_segmenter

CLIP = ClipSpec(model=TINY_MODEL, pretrained="none", batch_size=4)
SEGMENTER = SegmenterSpec(name="annotations")


def _sample(seed: int) -> Sample:
    """A random 40 x 56 image with ground truth (2 segments) and both segments selected."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    segment_map = np.zeros((40, 56), dtype=np.uint8)
    segment_map[2:20, 3:18] = 1
    segment_map[(rng.random((40, 56)) < 0.3) & (segment_map == 0)] = 2
    selected = tuple(
        SelectedSegment(index=i, area=float((segment_map == i).mean()), bbox=mask_bbox(segment_map == i), label=None,
                        score=None)
        for i in (1, 2)
    )
    truth = Segmentation(id_map=segment_map.astype(np.int32), segments=(Segment(1, "a"), Segment(2, "b")))
    return Sample(key=f"k{seed}", source="test", caption=f"photo {seed}", image=image, annotation=truth,
                  segment_map=segment_map, segments=selected)


def _proxy(loader):
    """The model behind Beam's cross-process proxy, as RunInference hands it to a handler with large_model."""
    return multi_process_shared.MultiProcessShared(loader, tag=f"test-{uuid.uuid4().hex}", always_proxy=True).acquire()


def test_clip_embedder_through_a_proxy_equals_local() -> None:
    handler = ClipEmbedder(CLIP, share_across_processes=True)
    assert handler.share_model_across_processes() and handler.model_copies() == 1
    assert ClipEmbedder(CLIP, model_copies=2).model_copies() == 2
    assert not ClipEmbedder(CLIP).share_model_across_processes()
    batch = [_sample(1), _sample(2)]
    local = handler.run_inference(batch, load_clip(CLIP))
    remote = handler.run_inference(batch, _proxy(lambda: load_clip(CLIP)))
    for (sample_a, emb_a), (sample_b, emb_b), sample in zip(local, remote, batch, strict=True):
        assert sample_a is sample and sample_b is sample  # the caller's samples, not the server's copies
        np.testing.assert_array_equal(emb_a.segments, emb_b.segments)
        np.testing.assert_array_equal(emb_a.image, emb_b.image)
        np.testing.assert_array_equal(emb_a.caption, emb_b.caption)


def test_segmenter_handler_through_a_proxy_equals_local() -> None:
    handler = SegmenterModelHandler(SEGMENTER, share_across_processes=True, model_copies=3)
    assert handler.share_model_across_processes() and handler.model_copies() == 3
    batch = [_sample(3), _sample(4)]
    local = handler.run_inference(batch, create_segmenter(SEGMENTER))
    remote = handler.run_inference(batch, _proxy(lambda: create_segmenter(SEGMENTER)))
    for a, b in zip(local, remote, strict=True):
        np.testing.assert_array_equal(a.segmentation.id_map, b.segmentation.id_map)
        assert a.segmentation.segments == b.segmentation.segments


@pytest.mark.parametrize(
    ("sharing", "device", "copies", "shared"),
    [("auto", "cpu", None, False), ("auto", "cuda", None, True), ("auto", "cpu", 2, True),
     ("machine", "cpu", None, True), ("process", "cuda", None, False)],
)
def test_sharing_flags(sharing, device, copies, shared) -> None:
    config = BuildConfig("in", "out", device=device, model_sharing=sharing, model_copies=copies)
    assert config.share_models() is shared
    assert "model_sharing" not in config.output_defining()  # a resumed build may change it


def test_bad_sharing_flags_fail() -> None:
    with pytest.raises(ValueError, match="--model-copies must be >= 1"):
        BuildConfig("in", "out", model_copies=0)
    with pytest.raises(ValueError, match="needs --model-sharing machine"):
        BuildConfig("in", "out", model_sharing="process", model_copies=2)
    with pytest.raises(ValueError, match="--model-sharing must be one of"):
        BuildConfig("in", "out", model_sharing="gpu")
