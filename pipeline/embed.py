"""The embed stage: a Beam ``ModelHandler`` that runs CLIP (``clip.ClipModel.embed_samples``) through ``RunInference``.

Use it as ``samples | 'Embed' >> RunInference(ClipEmbedder(spec)).with_exception_handling()``; each output is
``(sample, Embeddings)``: the L2-normalised image embeddings of the sample's segment crops and whole image and the
text embedding of its caption. A failed batch runs again one sample at a time (``batch_failures``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from apache_beam.metrics import Metrics

from spatext.pipeline.clip import TIMINGS, ClipModel, ClipSpec, load_clip
from spatext.pipeline.model_stage import ModelStage
from spatext.pipeline.records import Embeddings, Sample

METRICS_NAMESPACE = "spatext_embed"


def _embed_fields(sample: Sample) -> Sample:
    """The sample without what the embed step does not read (the segmenter's full-size id maps)."""
    return dataclasses.replace(sample, annotation=None, segmentation=None)


def clip_model(spec: ClipSpec, torch_threads: int | None) -> ClipModel:
    """The CLIP model ``spec`` names, run on ``torch_threads`` (a module function: a model server process gets it
    pickled)."""
    return dataclasses.replace(load_clip(spec), torch_threads=torch_threads)


class ClipEmbedder(ModelStage):
    """The embed stage: CLIP image embeddings of segment crops and whole image, text embedding of the caption."""

    namespace, stage = METRICS_NAMESPACE, "embed"

    def __init__(self, spec: ClipSpec, share_across_processes: bool = False, model_copies: int | None = None,
                 torch_threads: int | None = None, own_servers: bool = False) -> None:
        """Keep the spec (batch size, model); see ``ModelStage`` for the sharing flags and ``torch_threads``."""
        super().__init__(spec.batch_size, share_across_processes, model_copies, torch_threads, own_servers)
        self.spec = spec
        # Where the stage's time goes (see ClipModel.embed_samples): wall and thread-CPU milliseconds per batch.
        self._timings = {name: Metrics.distribution(METRICS_NAMESPACE, name) for name in TIMINGS}
        self._images = Metrics.counter(METRICS_NAMESPACE, "images_embedded")

    def model_factory(self) -> Callable[[], ClipModel]:
        """Loads the CLIP model named by the spec (in the worker process, or in each model server when shared)."""
        return functools.partial(clip_model, self.spec, self.call_threads)

    def run_inference(
        self, batch: Sequence[Sample], model: ClipModel, inference_args: dict[str, Any] | None = None
    ) -> Iterable[tuple[Sample, Embeddings]]:
        """Embed a batch: all crops and whole images in one encode_image pass, all captions in one encode_text. A
        batch that fails is run again one sample at a time: a sample that fails alone is a ``FailedSample``."""
        return self.each_alone_on_failure(batch, lambda samples: self._embed(samples, model))

    def _embed(self, batch: Sequence[Sample], model: ClipModel) -> list[tuple[Sample, Embeddings]]:
        """One model call on ``batch``: (sample, embeddings) pairs in batch order."""
        # Only a method call on `model`: with --model-sharing machine it is a proxy to a model server process, and
        # the samples travel there without the fields the embed step does not read.
        embeddings, timings = model.embed_samples([_embed_fields(sample) for sample in batch])
        for name, value in timings.items():
            self._timings[name].update(round(value))
        self._images.inc(sum(len(sample.segments) + 1 for sample in batch))
        return list(zip(batch, embeddings, strict=True))

    def get_num_bytes(self, batch: Sequence[Sample]) -> int:
        """Bytes of the arrays and captions in a batch (cheaper than Beam's default of pickling it)."""
        return sum(s.image.nbytes + len(s.caption.encode()) + getattr(s.segment_map, "nbytes", 0) for s in batch)
