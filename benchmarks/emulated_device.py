"""A stand-in for a GPU segmenter on a machine without one, for `pipeline_overlap.py`.

`EmulatedDeviceSegmenter` returns the corpus's ground truth (like ``--segmenter annotations``) after spending a fixed
time per image asleep under a lock: no CPU and the GIL released, one batch at a time per model process, as a GPU
serialises the batches of the processes it serves. Build with
``--segmenter emulated_device:EmulatedDeviceSegmenter`` and this folder on PYTHONPATH (worker processes and the
model server import it too); the time per image comes from the environment variable below.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence

from spatext.pipeline.records import Sample, Segmentation
from spatext.pipeline.segmenters import SegmenterSpec
from spatext.pipeline.segmenters.annotations import AnnotationSegmenter

MS_PER_IMAGE_ENV = "SPATEXT_EMULATED_MS_PER_IMAGE"
_DEVICE = threading.Lock()  # one emulated device per process: a shared model server's callers queue here


class EmulatedDeviceSegmenter(AnnotationSegmenter):
    """Ground truth after `SPATEXT_EMULATED_MS_PER_IMAGE` ms per image of emulated device time."""

    name = "emulated-device"

    def __init__(self, spec: SegmenterSpec | None = None) -> None:
        super().__init__(spec)
        value = os.environ.get(MS_PER_IMAGE_ENV)
        if value is None:
            raise ValueError(f"set {MS_PER_IMAGE_ENV} to the emulated device time per image (ms)")
        self.seconds_per_image = float(value) / 1000
        self.busy_s = 0.0  # time spent on the emulated device by this process

    def segment(self, samples: Sequence[Sample]) -> list[Segmentation]:
        """Wait for the device, hold it for len(samples) x the time per image, then answer with the ground truth."""
        with _DEVICE:
            time.sleep(self.seconds_per_image * len(samples))
            self.busy_s += self.seconds_per_image * len(samples)
        return super().segment(samples)
