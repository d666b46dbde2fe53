"""Model sharing across processes (--model-sharing machine): the stages' handlers talk to their model only through
method calls, so Beam's cross-process model proxy gives the same outputs as the local model."""

from __future__ import annotations

import multiprocessing
import multiprocessing.managers
import os
import threading
import time
import uuid

import numpy as np
import pytest
from apache_beam.utils import multi_process_shared

from spatext.pipeline import build, model_stage
from spatext.pipeline import clip as clip_module
from spatext.pipeline.clip import TINY_MODEL, ClipSpec, load_clip
from spatext.pipeline.config import BuildConfig, parse_args
from spatext.pipeline.crop import mask_bbox
from spatext.pipeline.demo_corpus import write_corpus
from spatext.pipeline.embed import ClipEmbedder
from spatext.pipeline.model_stage import ModelServerLost, ModelServers
from spatext.pipeline.records import Sample, Segment, Segmentation, SelectedSegment
from spatext.pipeline.segment import SegmenterModelHandler, SerialSegmenter
from spatext.pipeline.segmenters.annotations import AnnotationSegmenter
from spatext.pipeline.segmenters.base import Segmenter, SegmenterSpec, create_segmenter

CLIP = ClipSpec(model=TINY_MODEL, pretrained="none", batch_size=4)
SEGMENTER = SegmenterSpec(name="annotations")


def _sample(seed: int) -> Sample:
    """A random 40 x 56 image with ground truth (2 segments) and both segments selected."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    segment_map = np.zeros((40, 56), dtype=np.uint8)
    segment_map[2:20, 3:18] = 1
    segment_map[(rng.random((40, 56)) < 0.3) & (segment_map == 0)] = 2
    selected = tuple(
        SelectedSegment(index=i, area=float((segment_map == i).mean()), bbox=mask_bbox(segment_map == i), label=None,
                        score=None)
        for i in (1, 2)
    )
    truth = Segmentation(id_map=segment_map.astype(np.int32), segments=(Segment(1, "a"), Segment(2, "b")))
    return Sample(key=f"k{seed}", source="test", caption=f"photo {seed}", image=image, annotation=truth,
                  segment_map=segment_map, segments=selected)


def _proxy(loader):
    """The model behind Beam's cross-process proxy (a server thread in this process), as RunInference hands it to a
    handler with Beam's large_model."""
    return multi_process_shared.MultiProcessShared(loader, tag=f"test-{uuid.uuid4().hex}", always_proxy=True).acquire()


class _Pid:
    """A stand-in model that says which process runs it."""

    def pid(self) -> int:
        return os.getpid()


def test_model_servers_are_processes_of_their_own_shared_by_tag() -> None:
    """Each server is a process of its own (not a thread of the worker that started it); calls go round the copies;
    another worker asking for the same tags gets the same servers."""
    tags = [f"spatext-test-{uuid.uuid4().hex}-{i}" for i in range(2)]
    servers = ModelServers(_Pid, tags)
    pids = {servers.pid() for _ in range(4)}
    assert len(pids) == 2 and os.getpid() not in pids
    again = ModelServers(_Pid, tags)  # as a second worker process would: connects, starts nothing new
    assert {again.pid() for _ in range(4)} == pids
    with pytest.raises(AttributeError):
        servers.__wrapped__  # noqa: B018 - dunder lookups do not reach a server
    started = list(servers._started)
    assert {p.pid for p in started} == pids and again._started == []
    servers.shutdown_servers()
    assert not any(p.is_alive() for p in started)


def test_stopping_servers_is_done_once_and_never_fails(monkeypatch) -> None:
    """A server whose stop request finds its port answering as something else (it ended and the port was reused) is
    terminated instead; a second stop (the build's ``stop_started_servers`` after a direct call) asks nothing."""
    servers = ModelServers(_Pid, [f"spatext-test-{uuid.uuid4().hex}"])
    started = list(servers._started)
    assert servers in model_stage._STARTED and len(started) == 1 and started[0].is_alive()
    handle = servers._handles[0]

    def reused_port() -> None:
        raise OSError("bad message length")  # what multiprocessing's handshake raises against a non-manager port

    monkeypatch.setattr(handle, "unsafe_hard_delete", reused_port)
    begin = time.monotonic()
    servers.shutdown_servers()
    assert not started[0].is_alive() and time.monotonic() - begin < 8  # terminated, without the 10 s grace
    assert servers not in model_stage._STARTED
    other = ModelServers(_Pid, [f"spatext-test-{uuid.uuid4().hex}"])  # a port reused by another Beam server
    other_started = list(other._started)

    def another_beam_server() -> None:
        raise multiprocessing.managers.RemoteError("KeyError: 'spatext-test-...'")

    monkeypatch.setattr(other._handles[0], "unsafe_hard_delete", another_beam_server)
    model_stage.stop_started_servers()
    assert not other_started[0].is_alive() and other not in model_stage._STARTED
    asked = []
    monkeypatch.setattr(handle, "unsafe_hard_delete", lambda: asked.append(1))
    servers.shutdown_servers()
    model_stage.stop_started_servers()
    assert asked == []


class _Dies:
    """A stand-in model whose every call ends its server process."""

    def pid(self) -> int:
        os._exit(1)


def test_a_lost_server_is_started_again_and_a_second_loss_fails_loudly(tmp_path) -> None:
    tag = f"spatext-test-{uuid.uuid4().hex}"
    servers = ModelServers(_Pid, [tag])
    first = servers.pid()
    os.kill(first, 9)  # the server dies between calls (the OOM killer, a driver fault)
    second = servers.pid()  # the call finds it gone, connects again (a new server) and runs there
    assert second not in (first, os.getpid()) and servers.pid() == second
    servers.shutdown_servers()
    dying = ModelServers(_Dies, [f"spatext-test-{uuid.uuid4().hex}"])
    with pytest.raises(ModelServerLost, match="ended twice"):
        dying.pid()  # dies, and the server started in its place dies too
    assert not issubclass(ModelServerLost, Exception)  # past each_alone_on_failure and RunInference's dead letter
    dying.shutdown_servers()


class _DiesThenCannotStart:
    """A stand-in model whose call ends its server and which cannot be built again (``DIES_ONCE``: a marker file)."""

    def __init__(self) -> None:
        if os.path.exists(os.environ["DIES_ONCE"]):
            raise RuntimeError("cannot start again")

    def pid(self) -> int:
        open(os.environ["DIES_ONCE"], "w").close()
        os._exit(1)


def test_a_server_that_cannot_start_again_fails_loudly(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DIES_ONCE", str(tmp_path / "died"))
    servers = ModelServers(_DiesThenCannotStart, [f"spatext-test-{uuid.uuid4().hex}"])
    with pytest.raises(ModelServerLost, match="a new one failed to start"):
        servers.pid()


class DiesOnceSegmenter(AnnotationSegmenter):
    """Ground truth, but the first call in the run (``DIES_ONCE`` names a marker file) ends its server process."""

    def segment(self, samples):
        marker = os.environ["DIES_ONCE"]
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return super().segment(samples)


def test_a_build_survives_a_lost_server_and_stops_its_servers(tmp_path, monkeypatch) -> None:
    """An in-process build with --model-server process: the segment server dies on its first call, the stage starts
    another and every sample is accepted; when the build returns, no server it started is left running."""
    monkeypatch.setenv("DIES_ONCE", str(tmp_path / "died"))
    write_corpus(str(tmp_path / "corpus"), 4, seed=2, fmt="webdataset", samples_per_shard=2)
    config, rest = parse_args(["--input", str(tmp_path / "corpus" / "*.tar"), "--output", str(tmp_path / "out"),
                               "--segmenter", "test_model_sharing:DiesOnceSegmenter", "--clip-model", TINY_MODEL,
                               "--clip-pretrained", "none", "--model-sharing", "machine", "--model-server", "process"])
    before = {child.pid for child in multiprocessing.active_children()}
    _, manifest = build.execute(config, rest)
    assert (tmp_path / "died").exists() and manifest["counts"]["accepted"] == 4
    assert [c for c in multiprocessing.active_children() if c.pid not in before] == []  # stopped and joined


def test_clip_embedder_through_its_server_equals_local() -> None:
    handler = ClipEmbedder(CLIP, share_across_processes=True, own_servers=True)
    assert handler.server_copies == 1 and not handler.share_model_across_processes()  # ours, not Beam's thread
    assert ClipEmbedder(CLIP, model_copies=2, own_servers=True).server_copies == 2
    assert ClipEmbedder(CLIP).server_copies == 0 and ClipEmbedder(CLIP, share_across_processes=True).server_copies == 0
    batch = [_sample(1), _sample(2)]
    local = handler.run_inference(batch, load_clip(CLIP))
    model = handler.load_model()
    remote = handler.run_inference(batch, model)
    model.shutdown_servers()
    for (sample_a, emb_a), (sample_b, emb_b), sample in zip(local, remote, batch, strict=True):
        assert sample_a is sample and sample_b is sample  # the caller's samples, not the server's copies
        np.testing.assert_array_equal(emb_a.segments, emb_b.segments)
        np.testing.assert_array_equal(emb_a.image, emb_b.image)
        np.testing.assert_array_equal(emb_a.caption, emb_b.caption)


def test_segmenter_handler_through_its_servers_equals_local() -> None:
    handler = SegmenterModelHandler(SEGMENTER, share_across_processes=True, model_copies=2, own_servers=True)
    assert handler.server_copies == 2 and handler.model_copies() == 1  # two servers of ours; Beam loads one proxy
    model = handler.load_model()
    assert isinstance(model, ModelServers)
    batch = [_sample(3), _sample(4)]
    local = handler.run_inference(batch, create_segmenter(SEGMENTER))
    for _ in range(2):  # both servers
        remote = handler.run_inference(batch, model)
        for a, b in zip(local, remote, strict=True):
            np.testing.assert_array_equal(a.segmentation.id_map, b.segmentation.id_map)
            assert b.segmentation.id_map.dtype == np.int32  # narrowed to travel (records.narrow_ids), int32 again
            assert a.segmentation.segments == b.segmentation.segments
    model.shutdown_servers()


def test_beam_shares_the_model_by_default(monkeypatch) -> None:
    """--model-server thread (the default): Beam's own large_model, a server thread in a worker process."""
    handler = SegmenterModelHandler(SEGMENTER, share_across_processes=True, model_copies=3)
    assert handler.share_model_across_processes() and handler.model_copies() == 3 and handler.server_copies == 0
    batch = [_sample(3), _sample(4)]
    local = handler.run_inference(batch, create_segmenter(SEGMENTER))
    remote = handler.run_inference(batch, _proxy(handler.load_model))  # the SerialSegmenter behind the proxy
    for a, b in zip(local, remote, strict=True):
        np.testing.assert_array_equal(a.segmentation.id_map, b.segmentation.id_map)
        assert a.segmentation.segments == b.segmentation.segments
    with pytest.raises(ValueError, match="need model sharing"):
        SegmenterModelHandler(SEGMENTER, own_servers=True)
    monkeypatch.setattr(model_stage, "SPAWNS_SERVERS", False)  # a Beam whose MultiProcessShared cannot spawn
    with pytest.raises(ValueError, match="upgrade apache-beam or use --model-server thread"):
        SegmenterModelHandler(SEGMENTER, share_across_processes=True, own_servers=True)


@pytest.mark.parametrize(
    ("sharing", "device", "copies", "shared"),
    [("auto", "cpu", None, False), ("auto", "cuda", None, True), ("auto", "cpu", 2, True),
     ("machine", "cpu", None, True), ("process", "cuda", None, False)],
)
def test_sharing_flags(sharing, device, copies, shared) -> None:
    config = BuildConfig("in", "out", device=device, model_sharing=sharing, model_copies=copies)
    assert config.share_models() is shared
    assert "model_sharing" not in config.output_defining()  # a resumed build may change it


def test_bad_sharing_flags_fail() -> None:
    with pytest.raises(ValueError, match="--model-server process needs shared models"):
        BuildConfig("in", "out", model_server="process")  # auto on the CPU: no sharing
    with pytest.raises(ValueError, match="--model-server must be one of"):
        BuildConfig("in", "out", model_sharing="machine", model_server="gpu")
    assert BuildConfig("in", "out", model_copies=2, model_server="process").share_models()
    with pytest.raises(ValueError, match="--model-copies must be >= 1"):
        BuildConfig("in", "out", model_copies=0)
    with pytest.raises(ValueError, match="needs --model-sharing machine"):
        BuildConfig("in", "out", model_sharing="process", model_copies=2)
    with pytest.raises(ValueError, match="--model-sharing must be one of"):
        BuildConfig("in", "out", model_sharing="gpu")


class _Overlaps:
    """Counts how many threads are inside ``call`` at once (each call sleeps, so threads would overlap)."""

    def __init__(self) -> None:
        self.inside = self.most = 0
        self._count = threading.Lock()

    def call(self, result):
        with self._count:
            self.inside += 1
            self.most = max(self.most, self.inside)
        time.sleep(0.02)
        with self._count:
            self.inside -= 1
        return result


def _in_threads(fn, threads: int = 6) -> list:
    """fn(i) for i in range(threads), each on its own thread, started together; results in order."""
    results = [None] * threads
    start = threading.Barrier(threads)

    def work(i: int) -> None:
        start.wait()
        results[i] = fn(i)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results


class _Sleepy(Segmenter):
    """The ground truth, after a sleep that records overlapping calls."""

    name, weights_label = "sleepy", "test"

    def __init__(self) -> None:
        self.overlaps = _Overlaps()

    def segment(self, samples):
        return self.overlaps.call([s.annotation for s in samples])


def test_threads_sharing_a_segmenter_run_it_one_call_at_a_time() -> None:
    free = _Sleepy()
    _in_threads(lambda i: free.segment([_sample(i)]))
    assert free.overlaps.most > 1  # unwrapped, the threads do overlap: the check below can fail
    inner = _Sleepy()
    serial = SerialSegmenter(inner)
    results = _in_threads(lambda i: serial.segment([_sample(i)]))
    assert inner.overlaps.most == 1
    assert (serial.name, serial.weights_label) == ("sleepy", "test")
    for i, (segmentation,) in enumerate(results):  # each caller gets its own batch's result
        np.testing.assert_array_equal(segmentation.id_map, _sample(i).annotation.id_map)


def test_the_segment_stage_loads_a_serial_segmenter() -> None:
    model = SegmenterModelHandler(SEGMENTER).load_model()
    assert isinstance(model, SerialSegmenter) and model.name == "annotations"


def test_threads_sharing_clip_run_its_device_work_one_batch_at_a_time(monkeypatch) -> None:
    model = load_clip(CLIP)
    overlaps = _Overlaps()
    encode = clip_module.encode_pixels
    monkeypatch.setattr(clip_module, "encode_pixels", lambda m, pixels: overlaps.call(encode(m, pixels)))
    results = _in_threads(lambda i: model.embed_samples([_sample(i)])[0])
    assert overlaps.most == 1
    alone = model.embed_samples([_sample(4)])[0]
    np.testing.assert_array_equal(results[4][0].image, alone[0].image)  # threads do not mix up batches


def test_clip_timings_leave_out_the_wait_for_another_batch() -> None:
    model = load_clip(CLIP)
    model.embed_samples([_sample(0)])  # warm-up
    timings = []
    with model.device_lock:  # another batch holds the device for 0.5 s
        waiting = threading.Thread(target=lambda: timings.append(model.embed_samples([_sample(1)])[1]))
        waiting.start()
        time.sleep(0.5)
    waiting.join()
    assert timings[0]["preprocess_ms"] < 250


@pytest.mark.parametrize(("low", "high", "travels_as"), [
    (0, 0, np.uint8), (0, 255, np.uint8), (0, 256, np.uint16), (0, 65535, np.uint16), (0, 65536, np.int32),
    (-1, 5, np.int32),
])
def test_a_segmentation_travels_pickled_with_its_map_narrowed_and_comes_back_the_same(low, high, travels_as) -> None:
    """Model servers send segmentations back pickled: the ids travel in the smallest type that holds them and
    come back as the same int32 map."""
    import pickle

    rng = np.random.default_rng(high)
    id_map = rng.integers(low, high + 1, size=(48, 64), dtype=np.int32)
    id_map[0, 0], id_map[-1, -1] = low, high
    segmentation = Segmentation(id_map=id_map, segments=(Segment(1, "cat", 0.5),))
    data = pickle.dumps(segmentation, protocol=5)
    back = pickle.loads(data)
    assert back.id_map.dtype == np.int32 and np.array_equal(back.id_map, id_map)
    assert back.segments == segmentation.segments
    wide = pickle.dumps(id_map, protocol=5)
    assert len(data) < len(wide) - id_map.size * (4 - np.dtype(travels_as).itemsize) + 400
    assert pickle.loads(pickle.dumps(Segmentation(np.zeros((0, 3), np.int32), ()))).id_map.shape == (0, 3)

