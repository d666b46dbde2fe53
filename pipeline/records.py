"""The elements that flow between the build's stages (read -> decode -> segment -> select -> embed -> write).

Plain dataclasses of numpy arrays and builtins, so every runner can serialise them. A stage returns a new record
(``dataclasses.replace``) rather than mutating its input: Beam may hand the same element to several consumers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

REJECTS = "rejects"  # the tagged output every stage sends its Rejects to
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # CPython's default repr: '<... object at 0x7f3a...>'



@dataclass(frozen=True)
class RawSample:
    """One undecoded input as a reader found it."""

    key: str  # stable, unique across the dataset
    source: str  # the file (tar, folder, parquet) it came from
    image_bytes: bytes | None  # None when the input had no image
    caption: str | None  # None when the input had no caption
    annotation_png: bytes | None = None  # ground-truth panoptic id map (COCO-panoptic RGB PNG), if the corpus has it
    annotation: dict | None = None  # ground-truth segments json ({"segments_info": [...]}), if the corpus has it


@dataclass(frozen=True)
class Segment:
    """One segment of a segmentation: the pixels where ``id_map == id``."""

    id: int  # > 0; 0 in an id map means "no segment"
    label: str | None = None  # segmenter's class name
    score: float | None = None  # segmenter's confidence; None for ground truth


@dataclass(frozen=True)
class Segmentation:
    """A panoptic segmentation: an int32 id map (H x W) and the segments present in it; ``pixel_counts``, when the
    segmenter counted them, holds each segment's pixels (in ``segments`` order), so that selection need not count
    the map again (a bincount over every pixel: 0.25 ms per 512-px map, measured).

    Pickled (from a model server process to the worker that called it, or between a runner's workers) with the map
    in the smallest unsigned type that holds its ids: panoptic ids are small, so a map of a few dozen segments travels
    as uint8, a quarter of the bytes, and comes back as the same int32 map (16 maps of 512 x 680: 22.3 MB and
    33 ms through a pipe between two processes as int32, 5.6 MB and 3 ms as uint8).
    """

    id_map: np.ndarray
    segments: tuple[Segment, ...]
    pixel_counts: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.pixel_counts is not None and len(self.pixel_counts) != len(self.segments):
            raise ValueError(f"{len(self.pixel_counts)} pixel counts for {len(self.segments)} segments")

    def __reduce__(self) -> tuple:
        """Pickle with the map narrowed (``narrow_ids``); unpickling widens it back to its own dtype."""
        return _segmentation, (narrow_ids(self.id_map), self.id_map.dtype.str, self.segments, self.pixel_counts)


def narrow_ids(id_map: np.ndarray) -> np.ndarray:
    """``id_map`` as uint8 or uint16 when its ids are all in that type's range, else unchanged."""
    if id_map.dtype.kind not in "iu" or id_map.itemsize == 1 or not id_map.size:
        return id_map
    low, high = int(id_map.min()), int(id_map.max())
    for narrow in (np.uint8, np.uint16):
        if low >= 0 and high <= np.iinfo(narrow).max and np.dtype(narrow).itemsize < id_map.itemsize:
            return id_map.astype(narrow)
    return id_map


def _segmentation(
    id_map: np.ndarray, dtype: str, segments: tuple[Segment, ...], pixel_counts: tuple[int, ...] | None = None
) -> Segmentation:
    """A pickled Segmentation back, its map in its own dtype again."""
    return Segmentation(id_map=id_map.astype(dtype, copy=False), segments=segments, pixel_counts=pixel_counts)


@dataclass(frozen=True)
class SelectedSegment:
    """A segment chosen for conditioning; its pixels are ``Sample.segment_map == index``."""

    index: int  # 1..K
    area: float  # fraction of the image
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive end), pixels of the stored image
    label: str | None
    score: float | None


@dataclass(frozen=True)
class Sample:
    """A decoded sample; later stages fill the optional fields."""

    key: str
    source: str
    caption: str
    image: np.ndarray  # H x W x 3 uint8 RGB, already resized (longest side <= image size)
    annotation: Segmentation | None = None  # ground truth carried by the corpus, resized with the image
    segmentation: Segmentation | None = None  # filled by the segment stage
    segment_map: np.ndarray | None = None  # H x W uint8, 0 = unconditioned, i = SelectedSegment.index; select stage
    segments: tuple[SelectedSegment, ...] = field(default_factory=tuple)  # select stage


@dataclass(frozen=True)
class Embeddings:
    """L2-normalised CLIP embeddings of one sample (float32 here; stored as float16)."""

    segments: np.ndarray  # K x D, row i-1 for SelectedSegment.index i
    image: np.ndarray  # D
    caption: np.ndarray  # D


@dataclass(frozen=True)
class Reject:
    """An input that did not become a sample, and why. Accepted + rejected = read, always."""

    key: str
    source: str
    stage: str  # read | decode | segment | select | embed
    reason: str  # a short machine-readable code, optionally followed by ': detail'

    def __post_init__(self) -> None:
        """Keep the reason reproducible: object addresses in exception texts ('<_io.BytesIO object at 0x7f..>')
        differ on every run, so a rerun's rejects table would differ; they are dropped. Text that UTF-8 cannot
        encode (lone surrogates from a non-UTF-8 file name or a '\\ud800' JSON escape) is written with backslash
        escapes, so the reject itself can always be written."""
        object.__setattr__(self, "reason", _ADDRESS.sub("", self.reason))
        for name in ("key", "source", "reason"):
            value = getattr(self, name)
            if not utf8_encodable(value):
                object.__setattr__(self, name, value.encode("utf-8", "backslashreplace").decode("utf-8"))


def utf8_encodable(text: str) -> bool:
    """Whether `text` encodes as UTF-8 (a str may hold lone surrogates, which Beam's coders and Parquet refuse)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def rejects_from_failed_batch(failure: tuple, stage: str, code: str, max_detail: int = 300) -> list[Reject]:
    """One Reject per sample of a batch that RunInference(...).with_exception_handling() sent to its dead letter.

    Beam shapes each dead-letter element as (batch, (exception type, repr(exception), traceback lines)).
    """
    batch, (_exc_type, exc_repr, _traceback) = failure
    return [Reject(s.key, s.source, stage, f"{code}: {exc_repr[:max_detail]}") for s in batch]
