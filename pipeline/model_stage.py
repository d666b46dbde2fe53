"""What the two model stages (segment.py, embed.py) share as Beam ``ModelHandler``s: full batches of the stage's batch
size, one model per worker process or one model server per machine, a failed batch run again one sample at a time
(``batch_failures``), and Beam metrics under the stage's namespace."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from spatext.pipeline.batch_failures import FailedSample, each_alone_on_failure
from spatext.pipeline.records import Sample
from spatext.pipeline.torch_threads import TORCH_DEFAULT

HOPELESS_AFTER = 2  # retried batches in a row that fail sample by sample before a failing batch is no longer retried


class ModelStage(ModelHandler):
    """Base of ``SegmenterModelHandler`` and ``ClipEmbedder``; subclasses set ``namespace`` and ``stage``."""

    namespace = "spatext"
    stage = "model"

    def __init__(self, batch_size: int, share_across_processes: bool = False, model_copies: int | None = None,
                 torch_threads: int | None = None) -> None:
        """The model is loaded on the worker by ``load_model``.

        ``share_across_processes``: one model server per machine for all worker processes (Beam's ``large_model``),
        ``model_copies``: that many servers (implies sharing); the default is one model per worker process, which
        runs torch on ``torch_threads`` intra-op threads (None: torch's default; a model server keeps the default).
        """
        shared = share_across_processes or model_copies is not None
        # set on the thread of every model call (the model keeps it): a model server, one process for every worker,
        # keeps torch's default
        self.call_threads = TORCH_DEFAULT if shared and torch_threads is not None else torch_threads
        # Full batches of ``batch_size`` (fewer only at a bundle's end), not Beam's adaptive sizing from one sample up,
        # which left a 128-sample demo build's batches at a mean of 4.9 of 8 (segment), 7.5 of 64 (embed) samples:
        # more, smaller model calls than the flag asks for (RunInference's metrics; full: 8.0 and 64.0).
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size, large_model=share_across_processes,
                         model_copies=model_copies)
        self._retried = Metrics.counter(self.namespace, f"{self.stage}_batches_run_one_by_one")
        self._hopeless = 0  # retried batches in a row in which every sample failed alone too

    def each_alone_on_failure(self, batch: Sequence[Sample], infer: Callable[[Sequence[Sample]], list[Any]]
                              ) -> list[Any | FailedSample]:
        """``infer(batch)``, or each sample alone when the batch fails (counted in ``STAGE_batches_run_one_by_one``).

        After ``HOPELESS_AFTER`` retried batches in a row in which every sample failed alone as well, the model itself
        is failing (not one sample): a failing batch is then not run again (its samples are rejected with the batch's
        error, by RunInference's dead letter), so a broken model costs one call per batch, not one per sample, until
        a batch succeeds again."""
        if self._hopeless >= HOPELESS_AFTER:
            out = infer(batch)  # raises to the dead letter while the model keeps failing
            self._hopeless = 0
            return out
        out = each_alone_on_failure(batch, infer, self._retried)
        failed_alone = len(batch) > 1 and all(isinstance(item, FailedSample) for item in out)
        self._hopeless = self._hopeless + 1 if failed_alone else 0
        return out

    def get_metrics_namespace(self) -> str:
        """RunInference's own metrics (latency, counts) share the stage's namespace."""
        return self.namespace
