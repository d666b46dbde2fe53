"""Select stage: pick K random segments above the size threshold and paint them into the uint8 segment map.

Randomness is a pure function of (seed, key): the same input and seed give the same rows on any runner, any worker
count, any retry (DESIGN.md, "Selection").
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import apache_beam as beam
import numpy as np

from spatext.pipeline.crop import mask_bbox
from spatext.pipeline.records import REJECTS, Reject, Sample, Segmentation, SelectedSegment

MAX_K = 255  # the segment map is uint8


@dataclass(frozen=True)
class SelectOptions:
    """Selection parameters (DESIGN.md defaults)."""

    min_area: float = 0.05
    k_min: int = 1
    k_max: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_area <= 1.0:
            raise ValueError(f"--min-area must be a fraction in [0, 1], got {self.min_area}")
        if not 1 <= self.k_min <= self.k_max <= MAX_K:
            raise ValueError(f"need 1 <= --k-min <= --k-max <= {MAX_K}, got k_min={self.k_min}, k_max={self.k_max}")


def sample_rng(seed: int, key: str) -> np.random.Generator:
    """A generator seeded by a hash of (seed, key) only: independent of runner, worker and order."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def segment_areas(segmentation: Segmentation) -> dict[int, float]:
    """Area (fraction of the image) of each listed segment, from its pixels in the id map. Small ids are counted with
    one bincount; COCO-panoptic ids (R + 256 G + 256² B, up to 2²⁴) with np.unique, where a bincount would allocate
    one counter per possible id (128 MB per image). Counts the segmenter already took (``pixel_counts``) are used
    as they are."""
    id_map = segmentation.id_map
    total = id_map.size
    if segmentation.pixel_counts is not None:
        return {s.id: count / total for s, count in zip(segmentation.segments, segmentation.pixel_counts, strict=True)}
    if max((s.id for s in segmentation.segments), default=0) < 1 << 16 and (not total or id_map.max() < 1 << 16):
        counts = np.bincount(id_map.ravel(), minlength=max((s.id for s in segmentation.segments), default=0) + 1)
        return {s.id: float(counts[s.id]) / total for s in segmentation.segments if s.id < counts.size}
    ids, counts = np.unique(id_map, return_counts=True)
    found = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    return {s.id: found.get(s.id, 0) / total for s in segmentation.segments}


def choose_segments(segmentation: Segmentation, key: str, options: SelectOptions) -> list[int]:
    """Segment ids to condition on: K ~ U[k_min, k_max] capped by the candidates, then K candidates at random."""
    areas = segment_areas(segmentation)
    candidates = sorted(sid for sid, area in areas.items() if sid > 0 and area >= options.min_area and area > 0)
    if not candidates:
        return []
    rng = sample_rng(options.seed, key)
    k = min(int(rng.integers(options.k_min, options.k_max + 1)), len(candidates))
    return [int(i) for i in rng.choice(candidates, size=k, replace=False)]


def apply_selection(sample: Sample, segmentation: Segmentation, chosen: list[int]) -> Sample:
    """Paint the chosen segments into a uint8 map (index i = i-th chosen) and describe them."""
    id_map = segmentation.id_map
    segment_map = np.zeros(id_map.shape, dtype=np.uint8)
    by_id = {s.id: s for s in segmentation.segments}
    selected = []
    for index, sid in enumerate(chosen, start=1):
        mask = id_map == sid
        segment_map[mask] = index
        info = by_id[sid]
        selected.append(
            SelectedSegment(
                index=index,
                area=np.count_nonzero(mask) / mask.size,  # = mask.mean(), 10x faster on a bool mask
                bbox=mask_bbox(mask),
                label=info.label,
                score=info.score,
            )
        )
    return dataclasses.replace(sample, segment_map=segment_map, segments=tuple(selected))


class Select(beam.DoFn):
    """Segmented Sample -> Sample with segment_map + segments, or Reject('no_segment_above_threshold')."""

    def __init__(self, options: SelectOptions) -> None:
        self.options = options
        self.selected = beam.metrics.Metrics.counter("spatext_select", "samples_selected")
        self.segments = beam.metrics.Metrics.counter("spatext_select", "segments_selected")
        self.rejected = beam.metrics.Metrics.counter("spatext_select", "rejected")

    def process(self, sample: Sample) -> Iterator:
        if sample.segmentation is None:
            raise ValueError(f"sample {sample.key!r} reached selection without a segmentation")
        chosen = choose_segments(sample.segmentation, sample.key, self.options)
        if not chosen:
            self.rejected.inc()
            yield beam.pvalue.TaggedOutput(
                REJECTS, Reject(sample.key, sample.source, "select", "no_segment_above_threshold")
            )
            return
        self.selected.inc()
        self.segments.inc(len(chosen))
        # The annotation and the full segmentation are not needed downstream: drop them to keep elements small.
        yield dataclasses.replace(
            apply_selection(sample, sample.segmentation, chosen), annotation=None, segmentation=None
        )
