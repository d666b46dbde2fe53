"""Shared test setup: offline hub, few torch threads, and small corpus builders."""

from __future__ import annotations

import io
import os
import tarfile

os.environ["HF_HUB_OFFLINE"] = "1"  # a missing-weights path must fail in seconds, not after retries
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


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
