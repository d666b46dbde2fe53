"""The same command on three runners — DirectRunner, its multi_processing mode (with models shared across the worker
processes), and the portable runner API through Beam's local job service (the path Spark and Flink job servers take)
— gives the same rows."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from conftest import assert_same_rows, read_rows
from spatext.pipeline import build
from spatext.pipeline.config import parse_args
from spatext.pipeline.demo_corpus import write_corpus
from spatext.pipeline.torch_threads import worker_torch_threads

TINY = ["--clip-model", "spatext-tiny", "--clip-pretrained", "none", "--image-format", "png"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job_service():
    """Beam's local job service on a free loopback port, stopped after the tests."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the local job service did not start within 60 s")
    yield f"localhost:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def test_three_runners_give_the_same_rows(tmp_path, job_service):
    write_corpus(str(tmp_path / "corpus"), 8, seed=9, fmt="webdataset", samples_per_shard=3)
    runs = {
        "direct": [],
        # worker processes sending their batches to one model server (the GPU set-up; here on the CPU)
        "multi_processing": ["--direct_num_workers=2", "--direct_running_mode=multi_processing",
                             "--model-sharing", "machine"],
        "portable": ["--runner", "PortableRunner", "--job_endpoint", job_service, "--environment_type", "LOOPBACK"],
    }
    rows, threads = {}, {}
    launcher_threads = torch.get_num_threads()
    for name, beam_args in runs.items():
        out = tmp_path / name
        config, rest = parse_args(["--input", str(tmp_path / "corpus" / "*.tar"), "--output", str(out), *TINY,
                                   *beam_args])
        result, manifest = build.execute(config, rest)
        assert manifest["counts"]["accepted"] == 8, name
        rows[name] = read_rows(out)
        found = result.metrics().query(MetricsFilter().with_name("torch_threads"))["distributions"]
        threads[name] = {d.key.metric.namespace: (d.committed.min, d.committed.max) for d in found}
        assert torch.get_num_threads() == launcher_threads  # an in-process job leaves this process's setting alone,
        seen: list[int] = []  # also for threads started after it (a worker thread's setting reaches those)
        thread = threading.Thread(target=lambda out=seen: out.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert seen == [launcher_threads], name
    assert_same_rows(rows["multi_processing"], rows["direct"])
    assert_same_rows(rows["portable"], rows["direct"])
    # --torch-threads auto: torch's default in a lone DirectRunner worker, one thread per worker process elsewhere,
    # and torch's default again in the model server that the worker processes share (a fresh process's default)
    fresh = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                               capture_output=True, text=True, check=True).stdout)
    assert threads == {"direct": {"spatext_decode": (launcher_threads,) * 2, "spatext_embed": (launcher_threads,) * 2},
                       "multi_processing": {"spatext_decode": (1, 1), "spatext_embed": (fresh, fresh)},
                       "portable": {"spatext_decode": (1, 1), "spatext_embed": (1, 1)}}


def test_model_servers_of_their_own_give_the_same_rows(tmp_path) -> None:
    """--model-server process: worker processes send their batches to server processes of their own (two per model
    here), and the rows are those of an in-process build; the run's metrics count every sample through both."""
    write_corpus(str(tmp_path / "corpus"), 6, seed=4, fmt="webdataset", samples_per_shard=2)
    rows = {}
    for name, extra in (("direct", []), ("servers", ["--direct_num_workers=2", "--direct_running_mode=multi_processing",
                                                     "--model-sharing", "machine", "--model-copies", "2",
                                                     "--model-server", "process"])):
        config, rest = parse_args(["--input", str(tmp_path / "corpus" / "*.tar"), "--output", str(tmp_path / name),
                                   *TINY, *extra])
        result, manifest = build.execute(config, rest)
        assert manifest["counts"]["accepted"] == 6, name
        assert {stage: calls["samples"] for stage, calls in build.model_calls(result).items()} == {"segment": 6,
                                                                                                "embed": 6}
        rows[name] = read_rows(tmp_path / name)
    assert_same_rows(rows["servers"], rows["direct"])


@pytest.mark.parametrize(("flags", "want"), [
    ([], None),
    (["--direct_num_workers=1"], None),
    (["--direct_num_workers=2", "--direct_running_mode=multi_processing"], 1),
    (["--direct_num_workers=4", "--direct_running_mode=multi_threading"], 1),
    (["--direct_num_workers=0", "--direct_running_mode=multi_processing"], 1),  # 0: one worker per core
    (["--direct_num_workers=2"], None),  # in_memory (the default mode) runs one worker anyway
    (["--runner", "directrunner"], None),
    (["--runner", "apache_beam.runners.portability.fn_api_runner.FnApiRunner"], None),
    (["--runner", "DataflowRunner"], 1),
    (["--runner", "PortableRunner"], 1),
])
def test_auto_torch_threads_by_runner(flags, want) -> None:
    assert worker_torch_threads(0, PipelineOptions(flags)) == want
    assert worker_torch_threads(3, PipelineOptions(flags)) == 3
    with pytest.raises(ValueError, match="--torch-threads must be >= 0"):
        parse_args(["--input", "x", "--output", "y", "--torch-threads", "-1"])
