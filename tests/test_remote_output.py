"""A build whose --output is on a remote filesystem (``spatexttest://``, Beam's registry sees it as gs:// is: paths are
URLs that only Beam's FileSystems reach): the same shards as a local build, verified, locked, resumable, replaced by
--overwrite, and drawn by inspect; and corpora (tars, folders, Parquet) read from it as from disk."""

from __future__ import annotations

import pytest
from PIL import Image
from remote_fs import RemoteTestFileSystem

from conftest import assert_same_rows, read_rows
from spatext import locks
from spatext.locks import LOCK_FILE
from spatext.pipeline import build
from spatext.pipeline.demo_corpus import write_corpus
from spatext.pipeline.inspect_shards import inspect_build
from spatext.pipeline.verify import verify_build

TINY = ["--clip-model", "spatext-tiny", "--clip-pretrained", "none", "--image-format", "png", "--image-size", "128"]


@pytest.fixture
def remote_root(tmp_path, monkeypatch):
    """spatexttest://X is tmp_path/remote/X."""
    root = tmp_path / "remote"
    root.mkdir()
    monkeypatch.setattr(RemoteTestFileSystem, "root", str(root))
    return root


def test_a_build_into_a_remote_output_equals_a_local_one_and_resumes(tmp_path, remote_root, monkeypatch) -> None:
    write_corpus(str(tmp_path / "corpus"), 8, seed=4, fmt="webdataset", samples_per_shard=3)
    argv = ["--input", str(tmp_path / "corpus" / "shard-*.tar"), *TINY]
    local = build.run([*argv, "--output", str(tmp_path / "local")])
    leases: list[str] = []
    acquire = locks.RemoteLease.acquire

    def recorded(self: locks.RemoteLease) -> None:
        leases.append(self.path)
        acquire(self)

    monkeypatch.setattr(locks.RemoteLease, "acquire", recorded)
    monkeypatch.chdir(tmp_path)  # where a URL taken for a local folder would appear
    remote = build.run([*argv, "--output", "spatexttest://build"])
    assert [p.rsplit(".", 1)[0] for p in leases] == [f"spatexttest://build/{LOCK_FILE}"]  # the build held its lease
    assert not (tmp_path / "spatexttest:").exists()
    assert remote["counts"] == local["counts"] and local["counts"]["accepted"] == 8
    assert_same_rows(read_rows(remote_root / "build"), read_rows(tmp_path / "local"))
    assert not list((remote_root / "build").glob(f"{LOCK_FILE}*"))  # the claim was withdrawn at the end
    report = verify_build("spatexttest://build", progress=False)
    assert report.ok, report
    again = build.run([*argv, "--output", "spatexttest://build", "--resume"])  # every unit complete: nothing redone
    assert again["counts"] == local["counts"] and again["units_this_run"] == 0
    assert_same_rows(read_rows(remote_root / "build"), read_rows(tmp_path / "local"))
    with pytest.raises(FileExistsError, match="pass --resume to finish it or --overwrite to replace it"):
        build.run([*argv, "--output", "spatexttest://build"])
    build.run([*argv, "--output", "spatexttest://build", "--overwrite"])
    assert_same_rows(read_rows(remote_root / "build"), read_rows(tmp_path / "local"))
    assert verify_build("spatexttest://build", progress=False).ok
    inspect_build("spatexttest://build", "spatexttest://inspect/grid.png", num=4)  # read and written remotely
    with Image.open(remote_root / "inspect" / "grid.png") as grid:
        assert grid.size[0] > 320


@pytest.mark.parametrize("fmt", ["webdataset", "folder"])
def test_a_corpus_on_a_remote_filesystem_builds_as_a_local_one(tmp_path, remote_root, fmt) -> None:
    """--input on an object store (tars; a folder with captions.jsonl): the same rows as from disk."""
    write_corpus(str(remote_root / "corpus"), 6, seed=7, fmt=fmt, samples_per_shard=3)
    pattern = {"webdataset": "shard-*.tar", "folder": ""}[fmt]
    local_input = str(remote_root / "corpus" / pattern) if pattern else str(remote_root / "corpus")
    remote_input = f"spatexttest://corpus/{pattern}" if pattern else "spatexttest://corpus"
    local = build.run(["--input", local_input, *TINY, "--output", str(tmp_path / "local")])
    remote = build.run(["--input", remote_input, *TINY, "--output", str(tmp_path / "from_remote")])
    assert remote["counts"] == local["counts"] and local["counts"]["accepted"] == 6
    assert_same_rows(read_rows(tmp_path / "from_remote"), read_rows(tmp_path / "local"))


def test_a_parquet_corpus_on_a_remote_filesystem_builds_as_a_local_one(tmp_path, remote_root) -> None:
    """img2dataset-style Parquet on an object store: read through Beam's FileSystems, the same rows as from disk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spatext.pipeline.demo_corpus import encode_jpeg, generate_sample

    rows = [{"key": f"{i:09d}", "caption": s.caption, "jpg": encode_jpeg(s.image)}
            for i, s in ((i, generate_sample(i, 3)) for i in range(5))]
    (remote_root / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), remote_root / "pq" / "00000.parquet", row_group_size=2)
    model = [*TINY, "--segmenter", "mask2former", "--segmenter-weights", "none", "--segmenter-config",
             "mask2former-tiny", "--segmenter-threshold", "0", "--segmenter-mask-threshold", "0",
             "--segmenter-overlap-threshold", "0", "--segmenter-processor-size", "64", "--min-area", "0.01"]
    local = build.run(["--input", str(remote_root / "pq" / "*.parquet"), *model, "--output", str(tmp_path / "local")])
    remote = build.run(["--input", "spatexttest://pq/*.parquet", *model, "--output", str(tmp_path / "from_remote")])
    assert remote["counts"] == local["counts"] and local["counts"]["accepted"] == 5
    assert_same_rows(read_rows(tmp_path / "from_remote"), read_rows(tmp_path / "local"))
