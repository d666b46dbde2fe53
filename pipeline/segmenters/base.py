"""The segmenter interface: one spec, one abstract class, and a registry of backends (name -> factory).

Backends are imported lazily by their factories, so choosing ``annotations`` never imports transformers and an
optional backend (detectron2) is only imported when asked for. Add a backend with ``register_segmenter``.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from spatext.pipeline.records import Sample, Segment, Segmentation

RANDOM_INIT_LABEL = "none (random init)"  # weights_label of randomly initialised models; also in logs and metadata
GROUND_TRUTH_LABEL = "ground truth"  # weights_label of the annotations segmenter
DEFAULT_WEIGHTS = {  # what a backend loads when --segmenter-weights is not given
    "mask2former": "facebook/mask2former-swin-large-coco-panoptic",
    "detectron2": "model zoo checkpoint of --segmenter-config",
}


@dataclass(frozen=True)
class SegmenterSpec:
    """Which segmenter to build and how to run it (one config object, picklable for Beam workers)."""

    name: str  # a registered backend (see available_segmenters()) or module.path:callable
    weights: str | None = None  # hub name or local dir; "none" = random init; None = the backend's default
    config: str | None = None  # JSON of architecture kwargs for random init (path, or a packaged config's name)
    threshold: float = 0.8  # panoptic score threshold
    mask_threshold: float = 0.5  # binarisation threshold of mask probabilities
    overlap_threshold: float = 0.8  # min kept fraction of a query's mask for it to become a segment
    processor_size: int | None = None  # shortest edge fed to the model; None = the processor's default
    device: str = "cpu"
    batch_size: int = 4
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast for the model forward, on cuda only

    def __post_init__(self) -> None:
        """Reject values that no backend can use."""
        for field_name in ("threshold", "mask_threshold", "overlap_threshold"):
            value = getattr(self, field_name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SegmenterSpec.{field_name} must lie in [0, 1], got {value}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"--precision must be one of fp32, bf16, fp16; got {self.precision!r}")
        if self.batch_size < 1:
            raise ValueError(f"SegmenterSpec.batch_size must be >= 1, got {self.batch_size}")
        if self.processor_size is not None and self.processor_size < 1:
            raise ValueError(f"SegmenterSpec.processor_size must be >= 1 or None, got {self.processor_size}")


class Segmenter(ABC):
    """A panoptic segmenter: images in, one ``Segmentation`` (int32 H x W id map + segments) per image out."""

    name: str  # the registry name
    weights_label: str  # for output metadata: hub name / dir, RANDOM_INIT_LABEL, or GROUND_TRUTH_LABEL

    @abstractmethod
    def segment(self, samples: Sequence[Sample]) -> list[Segmentation]:
        """Segment each sample's image; the i-th result has exactly the i-th image's H x W."""


SegmenterFactory = Callable[[SegmenterSpec], Segmenter]


def _lazy(module: str, cls: str) -> SegmenterFactory:
    """A factory that imports ``module`` only when a segmenter is created."""

    def factory(spec: SegmenterSpec) -> Segmenter:
        return getattr(importlib.import_module(module), cls)(spec)

    factory.__qualname__ = f"lazy({module}.{cls})"
    return factory


SEGMENTERS: dict[str, SegmenterFactory] = {
    "annotations": _lazy("spatext.pipeline.segmenters.annotations", "AnnotationSegmenter"),
    "mask2former": _lazy("spatext.pipeline.segmenters.mask2former", "Mask2FormerSegmenter"),
    "detectron2": _lazy("spatext.pipeline.segmenters.detectron2_backend", "Detectron2Segmenter"),
}


# Built-in backends that segment pixels and never read a sample's ground truth.
MODEL_BACKENDS = ("mask2former", "detectron2")


def may_read_ground_truth(name: str) -> bool:
    """Whether segmenter ``name`` may read a sample's ground truth: not the built-in model backends; ``annotations``
    and a segmenter of your own may."""
    return name not in MODEL_BACKENDS


def register_segmenter(name: str, factory: SegmenterFactory) -> None:
    """Make ``factory`` available as ``--segmenter name`` (replaces an existing entry of that name)."""
    SEGMENTERS[name] = factory


def available_segmenters() -> list[str]:
    """The registered segmenter names, sorted."""
    return sorted(SEGMENTERS)


_PLUGIN = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def plugin_factory(name: str) -> SegmenterFactory | None:
    """The factory that ``module.path:callable`` names (a segmenter of your own: any importable callable taking a
    SegmenterSpec and returning a Segmenter), imported now; None for a name of another form. Worker processes import
    it again, so it must be installed (or on PYTHONPATH) wherever the job runs."""
    if not _PLUGIN.fullmatch(name):
        return None
    module, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--segmenter {name!r}: cannot import {attr} from {module} ({exc})") from exc
    if not callable(factory):
        raise ValueError(f"--segmenter {name!r}: {attr} is not callable")
    return factory


def check_segmenter_name(name: str) -> None:
    """Fail fast on a --segmenter that is neither registered, ``auto``, nor an importable ``module:callable``."""
    if name != "auto" and name not in SEGMENTERS and plugin_factory(name) is None:
        raise ValueError(f"--segmenter must be one of auto, {', '.join(available_segmenters())} or "
                         f"module.path:callable; got {name!r}")


def create_segmenter(spec: SegmenterSpec) -> Segmenter:
    """Build the segmenter that ``spec.name`` names: a registered backend or a ``module.path:callable``."""
    factory = SEGMENTERS.get(spec.name) or plugin_factory(spec.name)
    if factory is None:
        raise ValueError(f"unknown --segmenter {spec.name!r}; valid choices: {', '.join(available_segmenters())} "
                         "or module.path:callable")
    segmenter = factory(spec)
    if not isinstance(segmenter, Segmenter):
        raise TypeError(f"--segmenter {spec.name!r} made a {type(segmenter).__name__}, not a Segmenter")
    return segmenter


def autocast(spec: SegmenterSpec) -> contextlib.AbstractContextManager:
    """bf16 / fp16 autocast on cuda when the spec asks for it; a no-op otherwise."""
    if spec.device.startswith("cuda") and spec.precision != "fp32":
        return torch.autocast("cuda", dtype=torch.bfloat16 if spec.precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def weights_label(spec: SegmenterSpec) -> str:
    """What a build's metadata records as the segmenter's weights, before any model is loaded."""
    if spec.name == "annotations":
        return GROUND_TRUTH_LABEL
    if spec.weights == "none":
        return RANDOM_INIT_LABEL
    return spec.weights or DEFAULT_WEIGHTS.get(spec.name, "default")


def present_ids(id_map: np.ndarray) -> np.ndarray:
    """The sorted ids > 0 that occur in a non-negative id map."""
    return id_counts(id_map)[0]


def id_counts(id_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sorted ids > 0 that occur in a non-negative id map, and the pixels of each (bincount when ids are small:
    ~6x faster than unique)."""
    if not id_map.size:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if id_map.max() < 1 << 16:
        counts = np.bincount(id_map.ravel())
        ids = np.flatnonzero(counts)
        counts = counts[ids]
    else:
        ids, counts = np.unique(id_map, return_counts=True)
    positive = ids > 0
    return ids[positive].astype(np.int64), counts[positive].astype(np.int64)


def clean_segmentation(
    id_map: np.ndarray, segments: Iterable[Segment], shape: tuple[int, int] | None = None,
    present: Iterable[int] | None = None,
) -> Segmentation:
    """A consistent Segmentation: int32 map, ids without segment info -> 0, segments absent from the map dropped;
    with the kept segments' pixel counts where it counted them (``present`` not given).

    ``present``: the positive ids that occur in the map, when the segmenter knows them (Mask2Former's merge: exactly
    its segments' ids, tested), which saves counting them over every pixel (a bincount: 0.4-1.5 ms per 512 px map on
    this CPU, run while a model server holds its device for the call)."""
    ids = np.asarray(id_map)
    if ids.ndim != 2:
        raise ValueError(f"id_map must be 2-D (H x W), got shape {ids.shape}")
    if shape is not None and ids.shape != tuple(shape):
        raise ValueError(f"id_map has shape {ids.shape}, the image has {tuple(shape)}")
    if ids.dtype != np.int32 or (ids.size and ids.min() < 0):
        ids = np.where(ids > 0, ids, 0).astype(np.int32)  # negative ids (void) -> 0
    by_id: dict[int, Segment] = {}
    for seg in segments:
        by_id.setdefault(int(seg.id), seg)  # the first entry of a repeated id wins
    counted: dict[int, int] | None = None
    if present is None:
        found, pixels = id_counts(ids)
        counted = dict(zip(found.tolist(), pixels.tolist(), strict=True))
    present = set(counted) if counted is not None else {int(i) for i in present}
    unknown = sorted(present - by_id.keys())
    if unknown:  # their pixels become 0: the kept segments' counts stay as they are
        ids = np.where(np.isin(ids, unknown), 0, ids).astype(np.int32)
    kept_ids = [seg_id for seg_id in by_id if seg_id in present]  # input order kept
    counts = None if counted is None else tuple(counted[seg_id] for seg_id in kept_ids)
    return Segmentation(id_map=ids, segments=tuple(by_id[seg_id] for seg_id in kept_ids), pixel_counts=counts)
