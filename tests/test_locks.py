"""One spatext process per output folder: the lock a build and a training run hold (spatext/locks.py)."""

from __future__ import annotations

import subprocess
import sys
import time

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
