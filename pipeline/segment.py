"""The segment stage: a Beam ``ModelHandler`` that runs a segmenter through ``RunInference``.

Use it as ``samples | 'Segment' >> RunInference(SegmenterModelHandler(spec)).with_exception_handling()``; each output
is the input ``Sample`` with ``segmentation`` filled, in batch order. A batch whose segmenter call raises is run
again one sample at a time (``batch_failures``): a sample that fails alone comes out as a ``FailedSample`` (its
reject, with its own error, after ``SplitFailures``); a batch of one that fails goes to the dead-letter output
``failed_inferences`` as ``(batch: list[Sample], (exc_type, repr(exc), traceback_lines))``, which
``records.rejects_from_failed_batch`` turns into reject rows.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from apache_beam.metrics import Metrics

from spatext.pipeline.model_stage import ModelStage
from spatext.pipeline.records import Sample, Segmentation
from spatext.pipeline.segmenters.base import Segmenter, SegmenterSpec, create_segmenter
from spatext.pipeline.torch_threads import apply_torch_threads

METRICS_NAMESPACE = "spatext_segment"


class SerialSegmenter(Segmenter):
    """A segmenter that threads share, run one call at a time.

    Beam shares one model among a process's worker threads (``multi_threading``) and a model server serves each
    worker process on a thread of its own. PyTorch releases the GIL around every operator, so threads that launch a
    model's kernels at once hand the GIL back and forth at every operator. On a CPU that convoy is measurable
    (``benchmarks/shared_model.py``: 8 threads ran a small Mask2Former at 42 calls/s, one thread at 71); on an H100,
    Mask2Former fed by 8 worker processes through one server (before this lock) ran at 28 img/s against 76 img/s
    for one caller. Under the lock the other callers wait without contending.
    """

    def __init__(self, segmenter: Segmenter, torch_threads: int | None = None) -> None:
        """Wrap ``segmenter``; its ``name`` and ``weights_label`` stay readable here. ``torch_threads``: set on the
        calling thread before each call (torch's setting is per thread: a model server's threads may start after a
        worker's own setting; see pipeline/torch_threads.py)."""
        self.segmenter = segmenter
        self.name = segmenter.name
        self.weights_label = segmenter.weights_label
        self.torch_threads = torch_threads
        self._lock = threading.Lock()

    def segment(self, samples: Sequence[Sample]) -> list[Segmentation]:
        """The wrapped segmenter's result, computed while no other thread runs it."""
        with self._lock:
            apply_torch_threads(self.torch_threads)
            return self.segmenter.segment(samples)


def serial_segmenter(spec: SegmenterSpec, torch_threads: int | None) -> SerialSegmenter:
    """The segmenter ``spec`` names, wrapped to run one call at a time (a module function: a model server process
    gets it pickled)."""
    return SerialSegmenter(create_segmenter(spec), torch_threads)


class SegmenterModelHandler(ModelStage):
    """Loads the segmenter that a ``SegmenterSpec`` names and fills ``Sample.segmentation`` batch by batch."""

    namespace, stage = METRICS_NAMESPACE, "segment"

    def __init__(
        self, spec: SegmenterSpec, share_across_processes: bool = False, model_copies: int | None = None,
        torch_threads: int | None = None, own_servers: bool = False,
    ) -> None:
        """Keep the spec (batch size, model); see ``ModelStage`` for the sharing flags and ``torch_threads``."""
        super().__init__(spec.batch_size, share_across_processes, model_copies, torch_threads, own_servers)
        self.spec = spec
        self._images = Metrics.counter(METRICS_NAMESPACE, "images_segmented")
        self._segments = Metrics.counter(METRICS_NAMESPACE, "segments_found")
        self._empty = Metrics.counter(METRICS_NAMESPACE, "images_without_segments")

    def model_factory(self) -> Callable[[], Segmenter]:
        """Builds the segmenter (once per worker process, or in each model server when shared), run one call at a
        time by the threads that share it."""
        return functools.partial(serial_segmenter, self.spec, self.call_threads)

    def run_inference(
        self, batch: Sequence[Sample], model: Segmenter, inference_args: dict[str, Any] | None = None
    ) -> Iterable[Sample]:
        """Segment the batch in one call; return the samples with ``segmentation`` set, in batch order. A batch that
        fails is run again one sample at a time: a sample that fails alone is a ``FailedSample``."""
        self.validate_inference_args(inference_args)
        return self.each_alone_on_failure(batch, lambda samples: self._segment(samples, model))

    def _segment(self, batch: Sequence[Sample], model: Segmenter) -> list[Sample]:
        """One segmenter call on ``batch``: the samples with ``segmentation`` set, in batch order."""
        segmentations = model.segment(batch)  # model may be a cross-process proxy: call methods only
        self._check(batch, segmentations)
        outputs = []
        for sample, seg in zip(batch, segmentations, strict=True):
            self._images.inc()
            self._segments.inc(len(seg.segments))
            if not seg.segments:
                self._empty.inc()
            outputs.append(dataclasses.replace(sample, segmentation=seg))
        return outputs

    def _check(self, batch: Sequence[Sample], segmentations: Sequence[Any]) -> None:
        """Fail the batch when the segmenter broke its contract (one result per image, of the image's size)."""
        name = self.spec.name
        if len(segmentations) != len(batch):
            raise RuntimeError(f"segmenter {name!r} returned {len(segmentations)} results for {len(batch)} images")
        for sample, seg in zip(batch, segmentations, strict=True):
            if seg.id_map.shape != sample.image.shape[:2]:
                raise RuntimeError(
                    f"segmenter {name!r} returned an id map of shape {seg.id_map.shape} for sample "
                    f"{sample.key!r} of size {sample.image.shape[:2]}"
                )

    def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
        """Segmenters take all their settings from the spec; reject ``inference_args``."""
        if inference_args:
            raise ValueError(f"SegmenterModelHandler takes no inference_args, got {sorted(inference_args)}")

    def get_num_bytes(self, batch: Sequence[Sample]) -> int:
        """Bytes of image data in the batch (cheaper than pickling it, as the default does)."""
        return sum(sample.image.nbytes for sample in batch)
