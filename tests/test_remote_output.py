"""A build whose --output is on a remote filesystem (``spatexttest://``, Beam's registry sees it as gs:// is: paths are
URLs that only Beam's FileSystems reach): the same shards as a local build, verified, locked, resumable, replaced by
--overwrite, and drawn by inspect."""

from __future__ import annotations

import pytest
from PIL import Image
from remote_fs import RemoteTestFileSystem

from conftest import assert_same_rows, read_rows
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


def test_a_build_into_a_remote_output_equals_a_local_one_and_resumes(tmp_path, remote_root) -> None:
    write_corpus(str(tmp_path / "corpus"), 8, seed=4, fmt="webdataset", samples_per_shard=3)
    argv = ["--input", str(tmp_path / "corpus" / "shard-*.tar"), *TINY]
    local = build.run([*argv, "--output", str(tmp_path / "local")])
    remote = build.run([*argv, "--output", "spatexttest://build"])
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
