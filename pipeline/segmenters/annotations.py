"""The ``annotations`` segmenter: the corpus's own ground-truth panoptic annotation, as the decode stage resized it."""

from __future__ import annotations

from collections.abc import Sequence

from spatext.pipeline.records import Sample, Segmentation
from spatext.pipeline.segmenters.base import GROUND_TRUTH_LABEL, Segmenter, SegmenterSpec, clean_segmentation


class AnnotationSegmenter(Segmenter):
    """Returns each sample's ``annotation``, made consistent (segments absent after the resize are dropped)."""

    name = "annotations"
    weights_label = GROUND_TRUTH_LABEL

    def __init__(self, spec: SegmenterSpec | None = None) -> None:
        """Nothing to load; the spec is accepted for a uniform factory signature."""
        self.spec = spec

    def segment(self, samples: Sequence[Sample]) -> list[Segmentation]:
        """The cleaned ground truth of every sample; a sample without one is a bug upstream (ValueError)."""
        return [self._one(sample) for sample in samples]

    @staticmethod
    def _one(sample: Sample) -> Segmentation:
        """Clean one sample's annotation (its map is not copied when it is already consistent), with the segments'
        pixel counts for selection."""
        if sample.annotation is None:
            raise ValueError(
                f"sample {sample.key!r} has no annotation; --segmenter annotations needs a corpus with panoptic "
                "ground truth (the decode stage should have rejected this sample)"
            )
        ann = sample.annotation
        return clean_segmentation(ann.id_map, ann.segments, shape=sample.image.shape[:2])
