"""One bad sample fails only itself: a model batch that raises is run again one sample at a time.

RunInference's dead letter (``with_exception_handling``) holds whole batches, so without this a single sample that
breaks a model call (an image the model cannot take, a caption the tokenizer refuses) would reject every sample it
was batched with, each with that sample's error. The stage's handler calls ``each_alone_on_failure``; what still
fails alone comes out as a ``FailedSample``, which ``SplitFailures`` turns into that sample's own reject. A batch of
one that fails still goes to the dead letter (``records.rejects_from_failed_batch``), with its own error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import apache_beam as beam

from spatext.pipeline.records import REJECTS, Reject, Sample

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_DETAIL = 300  # characters of the exception's repr kept in the reject reason (as rejects_from_failed_batch)


@dataclass(frozen=True)
class FailedSample:
    """A sample whose model call failed when it ran alone, with the exception's repr."""

    sample: Sample
    error: str

    def reject(self, stage: str, code: str) -> Reject:
        """The sample's reject row: ``code: repr(exception)``."""
        return Reject(self.sample.key, self.sample.source, stage, f"{code}: {self.error[:MAX_DETAIL]}")


def each_alone_on_failure(
    batch: Sequence[Sample], infer: Callable[[Sequence[Sample]], list[T]], retried: Any = None
) -> list[T | FailedSample]:
    """``infer(batch)``; when that raises for a batch of several samples, ``infer([sample])`` for each sample, in
    order, with a ``FailedSample`` for each that fails alone. A batch of one re-raises (RunInference's dead letter
    then rejects it with its own error). ``retried``: a Beam counter of batches run again."""
    try:
        return infer(batch)
    except Exception as exc:
        if len(batch) == 1:
            raise
        logger.warning("a batch of %d samples failed (%s: %s); running them one at a time", len(batch),
                       type(exc).__name__, str(exc)[:200])
        if retried is not None:
            retried.inc()
    out: list[T | FailedSample] = []
    for sample in batch:
        try:
            out.extend(infer([sample]))
        except Exception as exc:  # this sample's own failure, kept as its reject reason
            out.append(FailedSample(sample, repr(exc)))
    return out


class SplitFailures(beam.DoFn):
    """After a model stage: ``FailedSample`` -> its reject (tagged ``REJECTS``), every other element unchanged."""

    def __init__(self, stage: str, code: str) -> None:
        self.stage, self.code = stage, code

    def process(self, element: object) -> Iterator:
        if isinstance(element, FailedSample):
            yield beam.pvalue.TaggedOutput(REJECTS, element.reject(self.stage, self.code))
        else:
            yield element
