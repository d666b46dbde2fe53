"""Mask2Former's panoptic merge, batched in torch on the logits' device.

Produces exactly what transformers' ``Mask2FormerImageProcessor.post_process_panoptic_segmentation`` produces with
``label_ids_to_fuse`` empty (same id map, same segment ids in the same order, same labels, same rounded scores), but
vectorised over queries and over the images of a batch that share a target size, instead of a Python loop over the
surviving queries of each image. Only the final id maps and the small per-segment lists leave the device.

One deliberate difference, only where the model input was padded (``image_fractions``): the reference stretches the
mask logits of the whole padded canvas onto each image, so an image's segments shift and shrink with the padding
that other images of its batch bring (tiny random model, a 391 x 512 image: Local IoU 0.32 alone, 0.13 next to a
512 x 232 image, 0.24 with the cut; the rest is the model seeing the padding; cf. transformers issue #39382). Like the
original Mask2Former (detectron2's ``sem_seg_postprocess``), this module cuts the padding off first; without padding
the result is the reference's, exactly.

The reference's recipe, which this module follows step by step (its comments and docstrings number the steps):
  0. (not in the reference) with ``image_fractions``: each image's part of the mask logits, without the padding;
  1. mask logits resized to a fixed 384 x 384 (bilinear, align_corners=False), then sigmoid;
  2. per query: score, label = max of softmax(class logits); kept when label != null class and score > threshold;
  3. kept probabilities resized to the target size (bilinear, align_corners=False) and multiplied by their scores;
  4. each pixel goes to the kept query of highest weighted probability (argmax: the first on ties);
  5. a kept query becomes a segment when it wins some pixel, its *weighted* probability is >= mask_threshold on
     some pixel, and (won pixels) / (pixels >= mask_threshold), a float32 ratio, is > overlap threshold;
  6. segments are numbered 1, 2, ... in query order; pixels won by a query that is not a segment get 0;
     an image with no kept query gets a map of -1 and no segments.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

REFERENCE_MASK_SIZE = (384, 384)  # transformers resizes every mask to this size first, whatever the model's input size
DEFAULT_MAX_ELEMENTS = 1 << 27  # images x kept queries x pixels merged at once (~1 GiB of temporaries)


@dataclass(frozen=True)
class PanopticSegment:
    """One segment of a panoptic id map: its id in the map, the model's class id, and the score rounded to 6 places."""

    id: int
    label_id: int
    score: float


@dataclass(frozen=True)
class PanopticResult:
    """One image's merge: an int32 id map on the CPU (0 = no segment; all -1 when no query passed) and its segments."""

    id_map: torch.Tensor
    segments: tuple[PanopticSegment, ...]


def panoptic_merge(
    class_queries_logits: torch.Tensor,
    masks_queries_logits: torch.Tensor,
    target_sizes: Sequence[tuple[int, int]] | None = None,
    threshold: float = 0.8,
    mask_threshold: float = 0.5,
    overlap_threshold: float = 0.8,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    image_fractions: Sequence[tuple[float, float]] | None = None,
) -> list[PanopticResult]:
    """Panoptic id maps and segments for a batch of Mask2Former outputs (see the module docstring for the recipe).

    Args:
        class_queries_logits: B x Q x (C + 1) class logits; the last class is "no object".
        masks_queries_logits: B x Q x h x w mask logits, on the same device.
        target_sizes: (height, width) of each image's id map; None keeps the reference's 384 x 384.
        threshold: a query is kept when its score is > threshold (and its class is not "no object").
        mask_threshold: a kept query's original mask is where its score-weighted probability is >= mask_threshold.
        overlap_threshold: a kept query becomes a segment when won / original area is > overlap_threshold.
        max_elements: bound on images x kept queries x pixels processed at once (device memory); one image at a
            time when a single image exceeds it.
        image_fractions: per image, the (height, width) of the image within the padded model input as fractions of
            the padded input, the image at its top left (from the processor's ``pixel_mask``: ``valid_fractions``);
            the mask logits beyond them are padding and are cut off (step 0). None: no padding (the reference).

    Returns:
        One ``PanopticResult`` per image, in batch order.
    """
    batch = _check_inputs(class_queries_logits, masks_queries_logits, target_sizes, image_fractions)
    if batch == 0:
        return []
    sizes: list[tuple[int, int] | None] = [None] * batch if target_sizes is None else [tuple(s) for s in target_sizes]
    fractions = [(1.0, 1.0)] * batch if image_fractions is None else [tuple(map(float, f)) for f in image_fractions]
    queries = _kept_queries(class_queries_logits, threshold)
    results: list[PanopticResult | None] = [None] * batch
    shapes = list(zip(sizes, fractions, strict=True))
    for rows, (size, fraction), kept in _chunks(shapes, queries.counts_host, max_elements):
        if kept == 0:
            chunk = [_nothing_kept(size) for _ in rows]
        else:
            extent = _image_extent(masks_queries_logits.shape[-2:], fraction)
            chunk = _merge_chunk(rows, size, extent, kept, queries, masks_queries_logits, mask_threshold,
                                 overlap_threshold)
        for row, result in zip(rows, chunk, strict=True):
            results[row] = result
    return results  # type: ignore[return-value]  # every row was filled


def valid_fractions(pixel_mask: torch.Tensor) -> list[tuple[float, float]]:
    """``image_fractions`` from a processor's B x H x W ``pixel_mask`` (1 = image, 0 = padding): per image, the
    (height, width) of its top-left rectangle of ones as fractions of H x W; a ValueError when a mask is not such a
    rectangle (transformers' processors pad at the bottom and right)."""
    if pixel_mask.ndim != 3:
        raise ValueError(f"pixel_mask must be B x H x W, got shape {tuple(pixel_mask.shape)}")
    mask = pixel_mask.bool()
    heights, widths = mask.any(2).sum(1), mask.any(1).sum(1)
    rows, cols = torch.arange(mask.shape[1], device=mask.device), torch.arange(mask.shape[2], device=mask.device)
    expected = (rows[None, :, None] < heights[:, None, None]) & (cols[None, None, :] < widths[:, None, None])
    bad = (mask != expected).flatten(1).any(1) | (heights == 0)
    if bad.any():
        raise ValueError(f"pixel_mask of image {int(bad.nonzero()[0])} is not a non-empty rectangle at the top left")
    return [(h / mask.shape[1], w / mask.shape[2]) for h, w in zip(heights.tolist(), widths.tolist(), strict=True)]


@dataclass(frozen=True)
class _KeptQueries:
    """Each query's score and label, and per image which queries passed (B x Q tensors on the logits' device)."""

    scores: torch.Tensor  # max of softmax(class logits)
    labels: torch.Tensor  # its argmax
    order: torch.Tensor  # per image: the kept queries first, in query order, then the others
    counts: torch.Tensor  # per image: how many queries were kept (B)
    counts_host: list[int]  # the same on the host


def _kept_queries(class_logits: torch.Tensor, threshold: float) -> _KeptQueries:
    """2. Score and label each query; keep it when its label is not "no object" and its score is > threshold."""
    scores, labels = F.softmax(class_logits, dim=-1).max(-1)
    keep = labels.ne(class_logits.shape[-1] - 1) & (scores > threshold)
    counts = keep.sum(1)
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices  # a stable sort of 0 = kept, 1 = not
    return _KeptQueries(scores, labels, order, counts, counts.tolist())


def _check_inputs(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    target_sizes: Sequence[tuple[int, int]] | None,
    image_fractions: Sequence[tuple[float, float]] | None = None,
) -> int:
    """The batch size after checking shapes and devices; a ValueError naming the argument otherwise."""
    if class_logits.ndim != 3 or class_logits.shape[-1] < 2:
        raise ValueError(f"class_queries_logits must be B x Q x (C + 1), got shape {tuple(class_logits.shape)}")
    if mask_logits.ndim != 4 or mask_logits.shape[:2] != class_logits.shape[:2]:
        raise ValueError(
            f"masks_queries_logits must be B x Q x h x w with the B x Q of class_queries_logits "
            f"{tuple(class_logits.shape[:2])}, got shape {tuple(mask_logits.shape)}"
        )
    if mask_logits.device != class_logits.device:
        raise ValueError(f"the logits lie on different devices: {class_logits.device} and {mask_logits.device}")
    batch = class_logits.shape[0]
    if target_sizes is not None:
        if len(target_sizes) != batch:
            raise ValueError(f"target_sizes has {len(target_sizes)} entries for a batch of {batch}")
        for size in target_sizes:
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"each of target_sizes must be a positive (height, width), got {tuple(size)}")
    if image_fractions is not None:
        if len(image_fractions) != batch:
            raise ValueError(f"image_fractions has {len(image_fractions)} entries for a batch of {batch}")
        for fraction in image_fractions:
            if len(fraction) != 2 or not all(0 < f <= 1 for f in fraction):
                raise ValueError(f"each of image_fractions must be a (height, width) in (0, 1], got {tuple(fraction)}")
    return batch


_Shape = tuple[tuple[int, int] | None, tuple[float, float]]  # (target size, image fraction of the logits)


def _chunks(
    shapes: list[_Shape], counts: list[int], max_elements: int
) -> Iterator[tuple[list[int], _Shape, int]]:
    """(rows, (target size, image fraction), max kept queries) of images merged together: the same target size and
    image fraction (images of one size get the same padding), within the element budget.

    Images with no kept query come as chunks of their own with 0 kept queries.
    """
    by_shape: dict[_Shape, list[int]] = {}
    for row, shape in enumerate(shapes):
        by_shape.setdefault(shape, []).append(row)
    for shape, rows in by_shape.items():
        size = shape[0]
        empty = [row for row in rows if counts[row] == 0]
        if empty:
            yield empty, shape, 0
        height, width = size or REFERENCE_MASK_SIZE
        pixels = max(height * width, REFERENCE_MASK_SIZE[0] * REFERENCE_MASK_SIZE[1])
        chunk: list[int] = []
        kept = 0
        for row in (row for row in rows if counts[row] > 0):
            wider = max(kept, counts[row])
            if chunk and (len(chunk) + 1) * wider * pixels > max_elements:
                yield chunk, shape, kept
                chunk, wider = [], counts[row]
            chunk.append(row)
            kept = wider
        if chunk:
            yield chunk, shape, kept


def _image_extent(grid: Sequence[int], fraction: tuple[float, float]) -> tuple[float, float]:
    """0. The image's (height, width) in mask-logit cells: `fraction` of the grid, snapped to whole cells within
    1e-6 (a fraction such as 800 / 1056 of 264 cells is 200 cells, not 199.99999999999997)."""
    extent = [size * part for size, part in zip(grid, fraction, strict=True)]
    return tuple(float(round(e)) if abs(e - round(e)) < 1e-6 else e for e in extent)  # type: ignore[return-value]


def _to_reference_grid(mask_logits: torch.Tensor, extent: tuple[float, float]) -> torch.Tensor:
    """0. + 1. (the resize) Mask logits -> 384 x 384, bilinear, align_corners=False, over the image's `extent`
    (height, width in logit cells from the top left): the rest of the grid is padding and is never read. The whole
    grid is the reference's resize, exactly; a smaller extent keeps the cells that reach into the image (rounded up:
    at a fractional edge, bilinear weights that would reach into the padding fall on the last image cell instead) and
    resamples the exact extent: output cell i samples (i + 0.5) * extent / 384 - 0.5, as a resize of the image alone
    would; the output beyond 384 is dropped."""
    cells = mask_logits[..., : math.ceil(extent[0]), : math.ceil(extent[1])]
    if cells.shape[-2:] == extent:  # whole cells (always so without padding): the reference's resize of them
        return F.interpolate(cells, size=REFERENCE_MASK_SIZE, mode="bilinear", align_corners=False)
    scale = (REFERENCE_MASK_SIZE[0] / extent[0], REFERENCE_MASK_SIZE[1] / extent[1])
    grid = F.interpolate(cells, scale_factor=scale, mode="bilinear", align_corners=False, recompute_scale_factor=False)
    return grid[..., : REFERENCE_MASK_SIZE[0], : REFERENCE_MASK_SIZE[1]]


def _nothing_kept(size: tuple[int, int] | None) -> PanopticResult:
    """The reference's answer when no query passes the score threshold: -1 everywhere, no segments."""
    return PanopticResult(torch.full(size or REFERENCE_MASK_SIZE, -1, dtype=torch.int32), ())


def _merge_chunk(
    rows: list[int],
    size: tuple[int, int] | None,
    extent: tuple[float, float],
    kept: int,
    queries: _KeptQueries,
    mask_logits: torch.Tensor,
    mask_threshold: float,
    overlap_threshold: float,
) -> list[PanopticResult]:
    """Merge images ``rows`` (one target size, one image extent in the logits) over ``kept`` slots: their kept
    queries in order, then padding."""
    device = mask_logits.device
    index = torch.tensor(rows, device=device)[:, None]  # G x 1
    slots = queries.order[index[:, 0], :kept]  # G x K query numbers
    slot_scores = queries.scores[index, slots]
    probs = _weighted_probs(mask_logits[index, slots], slot_scores, size, extent)
    if any(queries.counts_host[row] < kept for row in rows):  # padding: below every real weighted probability (>= 0)
        padding = torch.arange(kept, device=device) >= queries.counts[index]
        probs.masked_fill_(padding[:, :, None, None], -1.0)
    winner = _first_argmax(probs)  # 4. each pixel to its best slot: G x H x W
    original = _count_true(probs >= mask_threshold)  # 5. original and won area of each slot: G x K
    offsets = torch.arange(len(rows), device=device)[:, None, None] * kept
    won = torch.bincount((winner + offsets).flatten(), minlength=len(rows) * kept).view(len(rows), kept)
    ratio = won / original  # int64 / int64 -> float32, like the reference's division of 0-dim tensors
    segment = (won > 0) & (original > 0) & (ratio.double() > overlap_threshold)  # the reference compares floats
    # 6. number the segments in query order; pixels won by a slot that is not a segment -> 0
    ids = torch.where(segment, segment.cumsum(1), 0).to(torch.int32)
    id_maps = ids.gather(1, winner.flatten(1)).view(winner.shape).cpu()
    return [
        PanopticResult(id_map, _segments(ids_row, labels_row, scores_row))
        for id_map, ids_row, labels_row, scores_row in zip(
            id_maps, ids.tolist(), queries.labels[index, slots].tolist(), slot_scores.tolist(), strict=True
        )
    ]


def _weighted_probs(
    mask_logits: torch.Tensor, scores: torch.Tensor, size: tuple[int, int] | None, extent: tuple[float, float]
) -> torch.Tensor:
    """0. + 1. + 3. G x K mask logits (the image's `extent` of them) -> 384 x 384 -> sigmoid -> target size, times
    the scores (in place, as the reference does: the product keeps the probabilities' dtype)."""
    probs = _to_reference_grid(mask_logits, extent).sigmoid()
    if size is not None:
        probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
    return probs.mul_(scores[:, :, None, None])


def _first_argmax(probs: torch.Tensor) -> torch.Tensor:
    """``probs.argmax(1)``: the first maximum on ties. G x K x H x W -> G x H x W (int64).

    On the CPU, argmax reducing over a non-innermost dimension runs 1.3-2.8x slower (measured, K = 16-200) than
    "the smallest index equal to the maximum" with amax + where + amin, which vectorise over the pixels; elsewhere
    argmax is one pass over memory where that formulation makes four, so argmax it is.
    """
    if probs.device.type != "cpu":
        return probs.argmax(1)
    slots = probs.shape[1]
    dtype = torch.int16 if slots < torch.iinfo(torch.int16).max else torch.int32
    index = torch.arange(slots, dtype=dtype)[:, None, None]
    first = torch.where(probs == probs.amax(1, keepdim=True), index, slots).amin(1)
    return first.clamp_(max=slots - 1).long()  # NaN probabilities match nothing: stay in range rather than crash


def _count_true(mask: torch.Tensor) -> torch.Tensor:
    """Number of True pixels per (image, slot) of a G x K x H x W mask, as int64.

    Sums blocks of 128 pixels in uint8 (no overflow) before widening: summing the bool mask into int64 directly
    widens every pixel first and takes ~40x longer on the CPU.
    """
    flat = mask.view(torch.uint8).flatten(2)
    whole = flat.shape[-1] - flat.shape[-1] % 128
    counts = flat[..., whole:].sum(-1, dtype=torch.int64)
    if whole:
        blocks = flat[..., :whole].unflatten(-1, (-1, 128)).sum(-1, dtype=torch.uint8)
        counts += blocks.sum(-1, dtype=torch.int64)
    return counts


def _segments(ids: list[int], label_ids: list[int], scores: list[float]) -> tuple[PanopticSegment, ...]:
    """The segment list of one image from its slots (id 0 = not a segment); scores rounded like the reference."""
    return tuple(
        PanopticSegment(id=seg_id, label_id=label, score=round(score, 6))
        for seg_id, label, score in zip(ids, label_ids, scores, strict=True)
        if seg_id > 0
    )
