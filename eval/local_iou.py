r"""Local IoU: does the generated image put each region's content where its mask is? Higher is better.

The pipeline's segmenter interface (``create_segmenter(SegmenterSpec(...)).segment(samples)``) runs on the generated
image; for each input mask, the IoU with the best-matching predicted segment:

.. math:: \text{LocalIoU} = \frac{1}{\sum_j K_j}\sum_{j,i} \max_s \frac{|m_{j,i} \cap s|}{|m_{j,i} \cup s|}

over the predicted segments s (id > 0) of image j; an image with no predicted segment scores 0 for every region.
Masks are index maps of the image's H x W (``eval/masks.py``); the regions are the non-zero indices present. The
``annotations`` segmenter (ground truth) needs ``annotations``: one ``Segmentation`` per image, used for testing
(a ground-truth image against its own masks scores 1.0). ``LocalIoU`` (a torchmetrics Metric) and ``local_iou``
share ``local_iou_pairs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from spatext.eval.clip_distance import MeanOfPairs, check_images, check_lengths, mean_of
from spatext.eval.masks import check_index_map, region_indices
from spatext.pipeline.records import Sample, Segmentation
from spatext.pipeline.segmenters.base import Segmenter

DEFAULT_BATCH_SIZE = 4


def region_ious(index_map: np.ndarray, id_map: np.ndarray) -> np.ndarray:
    """Best IoU of each region of ``index_map`` (ascending index) with any segment (id > 0) of ``id_map``."""
    if index_map.shape != id_map.shape:
        raise ValueError(f"index map {index_map.shape} and predicted id map {id_map.shape} differ in shape")
    regions = region_indices(index_map)
    if not regions:
        return np.zeros(0, dtype=np.float64)
    segment_ids, segment_dense = np.unique(id_map, return_inverse=True)
    # Joint histogram: joint[r, s] = pixels in region r (index map value) and predicted segment s (dense label).
    rows = int(index_map.max()) + 1
    joint = np.bincount(
        index_map.ravel().astype(np.int64) * len(segment_ids) + segment_dense.ravel(),
        minlength=rows * len(segment_ids),
    ).reshape(rows, len(segment_ids)).astype(np.float64)
    union = joint.sum(axis=1, keepdims=True) + joint.sum(axis=0, keepdims=True) - joint
    iou = np.divide(joint, union, out=np.zeros_like(joint), where=union > 0)
    iou = iou[regions][:, segment_ids > 0]  # input regions only; predicted segments only (not id 0)
    return iou.max(axis=1) if iou.shape[1] else np.zeros(len(regions), dtype=np.float64)


def _samples(images: Sequence[np.ndarray], annotations: Sequence[Segmentation | None] | None) -> list[Sample]:
    """Pipeline records of the images for the segmenter (annotations attached when given)."""
    annotations = [None] * len(images) if annotations is None else list(annotations)
    return [
        Sample(key=f"eval-{j}", source="spatext.eval.local_iou", caption="", image=image, annotation=annotation)
        for j, (image, annotation) in enumerate(zip(images, annotations, strict=True))
    ]


def local_iou_pairs(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    segmenter: Segmenter,
    annotations: Sequence[Segmentation | None] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    """One best-match IoU per (image, region), images in order, regions by index (float64)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_images(images)
    check_lengths(images=images, masks=masks)
    if annotations is not None:
        check_lengths(images=images, annotations=annotations)
    for j, (image, index_map) in enumerate(zip(images, masks, strict=True)):
        check_index_map(index_map, image.shape[:2], name=f"masks[{j}]")
    samples = _samples(images, annotations)
    per_image: list[np.ndarray | None] = [None] * len(samples)
    for batch in size_batches([s.image.shape[:2] for s in samples], batch_size):
        segmentations = segmenter.segment([samples[j] for j in batch])
        if len(segmentations) != len(batch):
            raise RuntimeError(f"segmenter {segmenter.name!r} returned {len(segmentations)} results for {len(batch)}")
        for j, segmentation in zip(batch, segmentations, strict=True):
            per_image[j] = region_ious(masks[j], segmentation.id_map)
    values = [v for v in per_image if v is not None]
    return torch.from_numpy(np.concatenate(values) if values else np.zeros(0)).double()


def size_batches(shapes: Sequence[tuple[int, ...]], batch_size: int) -> list[list[int]]:
    """Indices of images in batches of at most `batch_size` images of one size each (sizes in first-seen order,
    images in order within a size). A model segmenter pads a batch to its largest image and the padding changes
    what it sees (see pipeline/segmenters/panoptic_merge.py): with peers of its own size only, an image's segments
    are what it gets alone, whatever else the benchmark holds."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for j, shape in enumerate(shapes):
        by_shape.setdefault(tuple(shape), []).append(j)
    return [rows[start : start + batch_size] for rows in by_shape.values() for start in range(0, len(rows), batch_size)]


def local_iou(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    segmenter: Segmenter,
    annotations: Sequence[Segmentation | None] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> torch.Tensor:
    """Functional Local IoU: mean over (image, region) of the best IoU with a predicted segment."""
    return mean_of(local_iou_pairs(images, masks, segmenter, annotations, batch_size))


class LocalIoU(MeanOfPairs):
    """Local IoU as a torchmetrics Metric (see ``local_iou``)."""

    higher_is_better = True

    def __init__(self, segmenter: Segmenter, batch_size: int = DEFAULT_BATCH_SIZE, **kwargs: Any) -> None:
        """Keep the segmenter (built with ``create_segmenter``) and its batch size."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        super().__init__(**kwargs)
        self.segmenter = segmenter
        self.batch_size = batch_size

    def update(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        annotations: Sequence[Segmentation | None] | None = None,
    ) -> None:
        """Accumulate the IoUs of every region of a batch of images."""
        self._accumulate(local_iou_pairs(images, masks, self.segmenter, annotations, self.batch_size))
