"""Segmentation backends behind one interface; pick one with ``create_segmenter(SegmenterSpec(name=...))``."""

from spatext.pipeline.segmenters.base import (
    GROUND_TRUTH_LABEL,
    RANDOM_INIT_LABEL,
    SEGMENTERS,
    Segmenter,
    SegmenterSpec,
    available_segmenters,
    check_segmenter_name,
    clean_segmentation,
    create_segmenter,
    register_segmenter,
)

__all__ = [
    "GROUND_TRUTH_LABEL",
    "RANDOM_INIT_LABEL",
    "SEGMENTERS",
    "Segmenter",
    "SegmenterSpec",
    "available_segmenters",
    "check_segmenter_name",
    "clean_segmentation",
    "create_segmenter",
    "register_segmenter",
]
