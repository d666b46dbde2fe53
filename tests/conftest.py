"""Shared test setup: offline hub, few torch threads, and small corpus builders."""

from __future__ import annotations

import importlib
import io
import os
import sys
import tarfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # a missing-weights path must fail in seconds, not after retries
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from spatext.pipeline.write import list_parquet  # noqa: E402


def jpeg_bytes(width: int = 64, height: int = 48, seed: int = 0, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A small random image, encoded."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: str, members: list[tuple[str, bytes]]) -> str:
    """Write a tar of (name, bytes) members in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def read_rows(out) -> list[dict]:
    """All shard rows of a build, sorted by key."""
    rows = [r for path in list_parquet(str(out)) for r in pq.read_table(path).to_pylist()]
    return sorted(rows, key=lambda r: r["key"])


def assert_same_rows(a: list[dict], b: list[dict]) -> None:
    """Rows equal column by column; embeddings equal up to float16 rounding.

    A CPU matmul's summation order depends on the batch it runs in, and batches differ between runners, so an
    embedding can land one float16 step away; everything else (keys, pixels, masks, selection) must be identical.
    """
    assert [r["key"] for r in a] == [r["key"] for r in b]
    embedding_columns = ("image_embedding", "caption_embedding")
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in ra.items() if k not in (*embedding_columns, "segments")} == {
            k: v for k, v in rb.items() if k not in (*embedding_columns, "segments")
        }
        for column in embedding_columns:
            np.testing.assert_allclose(ra[column], rb[column], atol=1e-3)
        strip = [[{k: v for k, v in s.items() if k != "embedding"} for s in r["segments"]] for r in (ra, rb)]
        assert strip[0] == strip[1]
        for sa, sb in zip(ra["segments"], rb["segments"], strict=True):
            np.testing.assert_allclose(sa["embedding"], sb["embedding"], atol=1e-3)


@pytest.fixture(scope="session", autouse=True)
def session_tmpdir(tmp_path_factory):
    """Point TMPDIR (and `tempfile`) at a folder of this session's pytest temp root, so that what libraries leave in
    the temp folder (Beam's shared-model address and lock files, torchelastic folders, pip build folders) goes away
    with pytest's old temp roots instead of piling up in /tmp run after run."""
    import tempfile

    folder = str(tmp_path_factory.mktemp("tmp"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", folder)
        patch.setattr(tempfile, "tempdir", folder)
        yield folder


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    """Import a module from benchmarks/ as its scripts do (their folder on sys.path)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))

    def load(name: str):
        sys.modules.pop(name, None)
        return importlib.import_module(name)

    return load


@pytest.fixture
def make_tar(tmp_path):
    """Factory: make_tar(name, members) -> path of a tar in tmp_path."""
    return lambda name, members: write_tar(str(tmp_path / name), members)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """A small build of the demo corpus (12 samples, 2 shards, tiny random-init CLIP with D=64, PNG images).

    Returns the build's output directory (shards/, rejects/, manifest.json). Built once per test session.
    """
    from spatext.pipeline import build
    from spatext.pipeline.demo_corpus import write_corpus

    root = tmp_path_factory.mktemp("demo_shards")
    write_corpus(str(root / "corpus"), 12, seed=11, fmt="webdataset", samples_per_shard=6)
    build.run([
        "--input", str(root / "corpus" / "shard-*.tar"), "--output", str(root / "build"), "--image-format", "png",
        "--clip-model", "spatext-tiny", "--clip-pretrained", "none", "--image-size", "256",
    ])
    return root / "build"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a test module of tiny models: on a busy 2-core machine two threads spinning
    against another process made them 10-100x slower (measured). Use with pytest.mark.usefixtures."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
