"""The embed stage: a Beam ``ModelHandler`` that runs CLIP (``clip.ClipModel.embed_samples``) through ``RunInference``.

Use it as ``samples | 'Embed' >> RunInference(ClipEmbedder(spec)).with_exception_handling()``; each output is
``(sample, Embeddings)``: the L2-normalised image embeddings of the sample's segment crops and whole image and the
text embedding of its caption. A failed batch runs again one sample at a time (``batch_failures``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from spatext.pipeline.batch_failures import each_alone_on_failure
from spatext.pipeline.clip import TIMINGS, ClipModel, ClipSpec, load_clip
from spatext.pipeline.records import Embeddings, Sample

METRICS_NAMESPACE = "spatext_embed"


def _embed_fields(sample: Sample) -> Sample:
    """The sample without what the embed step does not read (the segmenter's full-size id maps)."""
    return dataclasses.replace(sample, annotation=None, segmentation=None)



class ClipEmbedder(ModelHandler[Sample, tuple[Sample, Embeddings], ClipModel]):
    """The embed stage: CLIP image embeddings of segment crops and whole image, text embedding of the caption."""

    def __init__(self, spec: ClipSpec, share_across_processes: bool = False, model_copies: int | None = None) -> None:
        """Keep the spec; the model is loaded on the worker by ``load_model``.

        ``share_across_processes``: one model server per machine for all worker processes (Beam's ``large_model``),
        ``model_copies``: that many servers (implies sharing); the default is one model per worker process.
        """
        # Full batches of ``spec.batch_size`` (fewer only at a bundle's end), not Beam's adaptive sizing from one
        # sample up, which left a 128-sample demo build's batches at a mean of 4.9 of 8 (segment), 7.5 of 64 (embed)
        # samples: more, smaller model calls than the flag asks for (RunInference's metrics; full: 8.0 and 64.0).
        super().__init__(
            min_batch_size=spec.batch_size, max_batch_size=spec.batch_size, large_model=share_across_processes,
            model_copies=model_copies,
        )
        self.spec = spec
        # Where the stage's time goes (see ClipModel.embed_samples): wall and thread-CPU milliseconds per batch.
        self._timings = {name: Metrics.distribution(METRICS_NAMESPACE, name) for name in TIMINGS}
        self._images = Metrics.counter(METRICS_NAMESPACE, "images_embedded")
        self._retried = Metrics.counter(METRICS_NAMESPACE, "embed_batches_run_one_by_one")

    def load_model(self) -> ClipModel:
        """Load the CLIP model named by the spec."""
        return load_clip(self.spec)

    def run_inference(
        self, batch: Sequence[Sample], model: ClipModel, inference_args: dict[str, Any] | None = None
    ) -> Iterable[tuple[Sample, Embeddings]]:
        """Embed a batch: all crops and whole images in one encode_image pass, all captions in one encode_text. A
        batch that fails is run again one sample at a time: a sample that fails alone is a ``FailedSample``."""
        return each_alone_on_failure(batch, lambda samples: self._embed(samples, model), self._retried)

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

    def get_metrics_namespace(self) -> str:
        """Beam metrics namespace of the embed stage."""
        return METRICS_NAMESPACE

