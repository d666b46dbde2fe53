"""What the two model stages (segment.py, embed.py) share as Beam ``ModelHandler``s: full batches of the stage's batch
size, one model per worker process or model servers per machine (``ModelServers``), a failed batch run again one
sample at a time (``batch_failures``), and Beam metrics under the stage's namespace."""

from __future__ import annotations

import inspect
import itertools
import logging
import multiprocessing
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler
from apache_beam.utils import multi_process_shared

from spatext.pipeline.batch_failures import FailedSample, each_alone_on_failure
from spatext.pipeline.records import Sample
from spatext.pipeline.torch_threads import TORCH_DEFAULT

logger = logging.getLogger(__name__)

# Beam's own shared model (``large_model``) is served by a thread of whichever worker process loaded it first, so its
# kernel launches wait for the GIL behind that worker's Beam work; ``--model-server process`` gives it a process of
# its own (``ModelServers``), where this Beam's ``MultiProcessShared`` can spawn one.
SPAWNS_SERVERS = "spawn_process" in inspect.signature(multi_process_shared.MultiProcessShared).parameters

HOPELESS_AFTER = 2  # retried batches in a row that fail sample by sample before a failing batch is no longer retried


class ModelStage(ModelHandler):
    """Base of ``SegmenterModelHandler`` and ``ClipEmbedder``; subclasses set ``namespace`` and ``stage``."""

    namespace = "spatext"
    stage = "model"

    def __init__(self, batch_size: int, share_across_processes: bool = False, model_copies: int | None = None,
                 torch_threads: int | None = None, own_servers: bool = False) -> None:
        """The model is loaded on the worker by ``load_model``.

        ``share_across_processes``: one model server per machine for all worker processes, Beam's ``large_model`` (a
        thread of a worker process), or with ``own_servers`` a process of its own (``ModelServers``);
        ``model_copies``: that many servers (implies sharing). The default is one model per worker process, which
        runs torch on ``torch_threads`` intra-op threads (None: torch's default; a model server keeps the default).
        """
        shared = share_across_processes or model_copies is not None
        if own_servers and not shared:
            raise ValueError("own model servers need model sharing (--model-server process: --model-sharing machine)")
        if own_servers and not SPAWNS_SERVERS:
            raise ValueError("--model-server process needs an apache-beam whose MultiProcessShared can spawn a server "
                             "process (spawn_process; 2.77 has it): upgrade apache-beam or use --model-server thread")
        # set on the thread of every model call (the model keeps it): a model server, one process for every worker,
        # keeps torch's default
        self.call_threads = TORCH_DEFAULT if shared and torch_threads is not None else torch_threads
        self.server_copies = (model_copies or 1) if own_servers else 0
        # one tag for every worker of this pipeline (the handler travels to them pickled): they find the same servers
        self.server_tag = f"spatext-{self.stage}-{uuid.uuid4().hex}" if own_servers else None
        # Full batches of ``batch_size`` (fewer only at a bundle's end), not Beam's adaptive sizing from one sample up,
        # which left a 128-sample demo build's batches at a mean of 4.9 of 8 (segment), 7.5 of 64 (embed) samples:
        # more, smaller model calls than the flag asks for (RunInference's metrics; full: 8.0 and 64.0).
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size,
                         large_model=shared and not own_servers, model_copies=None if own_servers else model_copies)
        self._retried = Metrics.counter(self.namespace, f"{self.stage}_batches_run_one_by_one")
        self._hopeless = 0  # retried batches in a row in which every sample failed alone too

    def model_factory(self) -> Callable[[], Any]:
        """A picklable callable that builds the stage's model (a model server process runs it)."""
        raise NotImplementedError

    def load_model(self) -> Any:
        """The model (``model_factory()()``), or with own servers a ``ModelServers`` of proxies to the servers that the
        first worker process to get here starts (the others connect to them)."""
        factory = self.model_factory()
        if not self.server_copies:
            return factory()
        return ModelServers(factory, [f"{self.server_tag}-{i}" for i in range(self.server_copies)])

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


class ModelServerLost(BaseException):
    """A model server process ended (killed, out of memory) and the one started in its place failed as well.

    A ``BaseException``, so that neither the per-sample retry nor RunInference's dead letter (both catch ``Exception``)
    turns the lost server into rejected samples: the build fails, and ``--resume`` redoes the unfinished inputs."""


class ModelServers:
    """Proxies to a stage's model server processes (one per ``--model-copies``); each method call goes to the next
    server in turn, from an offset per worker process so that the workers spread over the servers.

    A server is Beam's ``MultiProcessShared`` with ``spawn_process``: the first process to ask for a tag starts the
    server (``factory`` builds the model there), later ones connect to it, and it ends with the process that started
    it (``build.execute`` stops the ones its own process started: ``stop_started_servers``). A call that finds its
    server gone connects again, which starts a new server, and runs once more there; a second loss raises
    ``ModelServerLost``. Calls from several workers reach a server on threads of its own; the models serialise them
    (``SerialSegmenter``, ``ClipModel.device_lock``). Only method calls work through it, and arguments and results
    travel pickled.
    """

    def __init__(self, factory: Callable[[], Any], tags: Sequence[str]) -> None:
        """Start or connect to the servers named by ``tags``."""
        self._factory, self._tags = factory, list(tags)
        self._lock = threading.Lock()  # one reconnection at a time (a worker's threads share this object)
        self._started: list[multiprocessing.Process] = []  # the server processes this process started
        self._index_of: dict[int, int] = {}  # a started process's server index, by pid
        self._own: set[int] = set()  # the indices of the servers it started
        # the handles keep each server's life line (a pipe whose closing stops the server) open as long as this
        self._handles: list[Any] = [None] * len(self._tags)
        self._proxies: list[Any] = [None] * len(self._tags)
        for index in range(len(self._tags)):
            self._connect(index)
        self._turn = itertools.count(os.getpid())

    def _connect(self, index: int) -> None:
        """Connect to server ``index``, starting it when no live one holds its tag."""
        before = {child.pid for child in multiprocessing.active_children()}
        handle = multi_process_shared.MultiProcessShared(self._factory, tag=self._tags[index], always_proxy=True,
                                                         spawn_process=True)
        self._handles[index], self._proxies[index] = handle, handle.acquire()
        started = [child for child in multiprocessing.active_children() if child.pid not in before]
        if started:
            self._started += started
            self._index_of.update((process.pid, index) for process in started)
            self._own.add(index)
            if self not in _STARTED:
                _STARTED.append(self)

    def shutdown_servers(self) -> None:
        """Stop the servers this process started (they stop anyway when it exits); others' servers keep running.

        A second call does nothing: a stopped server's port may belong to another program by then. A server that
        cannot be reached (it ended, or its port answers as something else) is terminated instead of asked, so
        that stopping servers never fails the build that used them."""
        if self in _STARTED:
            _STARTED.remove(self)
        own, self._own = sorted(self._own), set()
        unanswered = set()
        for index in own:
            try:
                self._handles[index].unsafe_hard_delete()
            except EOFError:  # the server ends before it answers
                pass
            # It ended already, or its port now belongs to another program (OSError, AuthenticationError) or to
            # another Beam server, which shares Beam's fixed key and answers RemoteError: any failure to stop it
            # is handled by terminating its process below, never by failing the build that used it.
            except Exception as exc:  # noqa: BLE001 - see above
                logger.info("model server %s did not answer its stop (%r)", self._tags[index], exc)
                unanswered.add(index)
        started, self._started = self._started, []
        for process in started:  # Beam's exit hook then finds nothing left to stop
            process.join(timeout=1 if self._index_of.get(process.pid) in unanswered else 10)
            if process.is_alive():
                logger.warning("model server process %d did not stop: terminating it", process.pid)
                process.terminate()
                process.join(timeout=10)

    def __getattr__(self, name: str) -> Any:
        """The named method of the next server."""
        if name.startswith("__") or "_proxies" not in self.__dict__:
            raise AttributeError(name)
        index = next(self._turn) % len(self._tags)

        def call(*args: Any, **kwargs: Any) -> Any:
            proxy = self._proxies[index]
            try:
                return getattr(proxy, name)(*args, **kwargs)
            except (EOFError, ConnectionError) as exc:
                logger.warning("model server %s is gone (%r): connecting again, which starts a new one",
                               self._tags[index], exc)
            with self._lock:
                if self._proxies[index] is proxy:  # another thread may have reconnected already
                    try:
                        self._connect(index)
                    except Exception as exc:  # the new server failed to start: as loud as a second loss
                        raise ModelServerLost(f"model server {self._tags[index]} ended and a new one failed to "
                                              f"start ({exc!r})") from exc
            try:
                return getattr(self._proxies[index], name)(*args, **kwargs)
            except (EOFError, ConnectionError) as exc:
                raise ModelServerLost(f"model server {self._tags[index]} ended twice ({exc!r}); failing the build "
                                      "rather than rejecting its samples (--resume redoes what is unfinished)") from exc

        return call


_STARTED: list[ModelServers] = []  # servers started by this process, for stop_started_servers


def stop_started_servers() -> None:
    """Stop every model server this process started (an in-process build's own; worker processes' servers end with
    them), so that builds run one after another in one process do not pile up models in memory."""
    while _STARTED:
        _STARTED.pop().shutdown_servers()
