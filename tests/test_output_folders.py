"""Output folders: one spatext process per folder (spatext/locks.py), and files deleted by their literal names."""

from __future__ import annotations

import subprocess
import sys
import time
from unittest import mock

import pytest

from spatext.locks import LOCK_FILE, folder_lock


def test_a_second_process_is_refused_while_the_first_holds_the_folder(tmp_path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from spatext.locks import folder_lock\n"
        f"with folder_lock({str(tmp_path)!r}, '--output'):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"--output '{tmp_path}' is in use by another spatext process "
                                             rf"\(pid {holder.pid} on .*\): one build or run per folder"):
            with folder_lock(str(tmp_path), "--output"):
                pass
        # a refused launch that saw no folder before the holder made it must not remove the holder's lock or folder
        with pytest.raises(ValueError, match="in use"), mock.patch("os.path.exists", return_value=False):
            with folder_lock(str(tmp_path), "--output"):
                pass
        assert (tmp_path / LOCK_FILE).is_file()
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 10  # a killed holder leaves no lock behind: the kernel released it
    while True:
        try:
            with folder_lock(str(tmp_path), "--output"):
                break
        except ValueError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    assert (tmp_path / LOCK_FILE).is_file()


def test_remote_folders_are_not_locked(tmp_path) -> None:
    with folder_lock("gs://bucket/build", "--output"), folder_lock("gs://bucket/build", "--output"):
        pass


def test_build_and_train_take_the_lock_of_their_output(demo_shards, tmp_path) -> None:
    """Held here (as another process would hold it), the folder refuses a build and a training run; nothing written."""
    from spatext.model import train
    from spatext.pipeline import build

    corpus = demo_shards.parent / "corpus"
    with folder_lock(str(tmp_path / "build"), "--output"):
        with pytest.raises(ValueError, match="is in use by another spatext process"):
            build.run(["--input", str(corpus / "shard-*.tar"), "--output", str(tmp_path / "build"),
                       "--clip-model", "spatext-tiny", "--clip-pretrained", "none"])
    assert sorted(p.name for p in (tmp_path / "build").iterdir()) == [LOCK_FILE]
    with folder_lock(str(tmp_path / "prior"), "--output"):
        with pytest.raises(ValueError, match="is in use by another spatext process"):
            train.main(["--data", str(demo_shards), "--config", "prior-tiny", "--output", str(tmp_path / "prior"),
                        "--max-train-steps", "2"])
    assert sorted(p.name for p in (tmp_path / "prior").iterdir()) == [LOCK_FILE]


def test_delete_files_takes_names_literally_on_every_filesystem(tmp_path) -> None:
    """Beam's local and GCS deletes glob their paths ('b[1]' would name 'b1'): local files are removed by name, gs://
    paths go escaped, others (s3://, which takes names literally) as they are."""
    from apache_beam.io.filesystems import FileSystems

    from spatext.paths import delete_files

    (tmp_path / "b1").mkdir()
    (tmp_path / "b[1]").mkdir()
    for folder in ("b1", "b[1]"):
        (tmp_path / folder / "x.parquet").write_bytes(b"x")
    with mock.patch.object(FileSystems, "delete") as remote:
        delete_files([str(tmp_path / "b[1]" / "x.parquet"), "gs://bkt/b[1]/x.parquet", "s3://bkt/b[1]/x.parquet"])
    assert not (tmp_path / "b[1]" / "x.parquet").exists() and (tmp_path / "b1" / "x.parquet").exists()
    remote.assert_called_once_with(["gs://bkt/b[[]1]/x.parquet", "s3://bkt/b[1]/x.parquet"])
