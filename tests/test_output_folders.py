"""Output folders: one spatext process per folder (spatext/locks.py), and files deleted by their literal names."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from unittest import mock

import pytest
from apache_beam.io.localfilesystem import LocalFileSystem

from spatext import locks
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


class _TestSchemeFileSystem(LocalFileSystem):
    """Beam's local filesystem under the URL scheme ``spatexttest://`` (rooted at ``root``): a remote filesystem to
    Beam's registry and to spatext, as gs:// is, but on this machine."""

    root = ""

    @classmethod
    def scheme(cls) -> str:
        return "spatexttest"

    def _local(self, path: str) -> str:
        return os.path.join(self.root, path.removeprefix("spatexttest://"))

    def create(self, path, *args, **kwargs):  # noqa: ANN001, ANN201, D102
        os.makedirs(os.path.dirname(self._local(path)), exist_ok=True)
        return super().create(self._local(path), *args, **kwargs)

    def open(self, path, *args, **kwargs):  # noqa: ANN001, ANN201, D102
        return super().open(self._local(path), *args, **kwargs)

    def exists(self, path):  # noqa: ANN001, ANN201, D102
        return super().exists(self._local(path))

    def last_updated(self, path):  # noqa: ANN001, ANN201, D102
        return super().last_updated(self._local(path))

    def delete(self, paths):  # noqa: ANN001, ANN201, D102
        return super().delete([self._local(p) for p in paths])


@pytest.fixture
def remote(tmp_path, monkeypatch):
    """A remote folder URL (``spatexttest://build``) whose files lie in tmp_path/build; short lease timings."""
    monkeypatch.setattr(_TestSchemeFileSystem, "root", str(tmp_path))
    monkeypatch.setattr(locks, "SETTLE_S", 0.2)
    return "spatexttest://build", tmp_path / "build" / LOCK_FILE


def test_a_remote_folder_is_locked_by_a_lease_that_its_holder_refreshes_and_deletes(remote) -> None:
    url, lock_file = remote
    lease = locks.RemoteLease(url, "--output", heartbeat_s=0.1)
    with lease.held():
        record = json.loads(lock_file.read_text())
        assert record == {"holder": f"pid {os.getpid()} on {socket.gethostname()}", "token": lease.token}
        with pytest.raises(ValueError, match=rf"--output '{url}' is in use by another spatext process \(pid "
                                             rf"{os.getpid()} on .*, lock refreshed \d+ s ago\): one build or run "
                                             rf"per folder.*delete {url}/{LOCK_FILE}"):
            with folder_lock(url, "--output"):
                pass
        os.utime(lock_file, (0, 0))  # the heartbeat rewrites it: its time moves on
        time.sleep(0.5)
        assert time.time() - lock_file.stat().st_mtime < 5
        assert json.loads(lock_file.read_text())["token"] == lease.token  # the refused launch left it alone
    assert not lock_file.exists()
    with folder_lock(url, "--output"):  # released: the next launch gets the folder
        assert lock_file.exists()


def test_a_dead_holders_remote_lock_is_refused_until_stale_then_taken_over(remote, caplog) -> None:
    url, lock_file = remote
    locks.RemoteLease(url, "--output").acquire()  # a launcher killed while holding it: nothing refreshes or deletes it
    with pytest.raises(ValueError, match="is in use by another spatext process"):
        locks.RemoteLease(url, "--output", stale_after_s=60, heartbeat_s=1).acquire()
    os.utime(lock_file, (time.time() - 61, time.time() - 61))
    taker = locks.RemoteLease(url, "--output", stale_after_s=60, heartbeat_s=1)
    with caplog.at_level("WARNING", logger="spatext.locks"), taker.held():
        assert json.loads(lock_file.read_text())["token"] == taker.token
    assert "taking over a stale lock" in caplog.text
    assert not lock_file.exists()


def test_of_two_launches_at_once_on_a_remote_folder_exactly_one_goes_on(remote, monkeypatch) -> None:
    """Both find the folder free (each writes only once both have looked), both write: one backs off."""
    url, lock_file = remote
    leases = [locks.RemoteLease(url, "--output") for _ in range(2)]
    outcomes: list[object] = [None, None]
    both_looked = threading.Barrier(2, timeout=10)
    write = locks.RemoteLease._write

    def write_when_both_looked(self: locks.RemoteLease) -> None:
        both_looked.wait()
        write(self)

    monkeypatch.setattr(locks.RemoteLease, "_write", write_when_both_looked)

    def launch(i: int) -> None:
        try:
            leases[i].acquire()
            outcomes[i] = "holds"
        except ValueError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=launch, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(str, outcomes)).count("holds") == 1, outcomes
    winner = leases[outcomes.index("holds")]
    assert json.loads(lock_file.read_text())["token"] == winner.token


def test_a_holder_that_lost_its_remote_lock_fails_when_its_block_ends(remote) -> None:
    """Taken over (it went unheard past the stale time): the heartbeat notices, the block's end raises, and the lock
    of the process that took it over stays."""
    url, lock_file = remote
    with pytest.raises(RuntimeError, match=r"lost its lock while it ran \(its lock file names pid 7 on elsewhere\)"):
        with locks.RemoteLease(url, "--output", heartbeat_s=0.1).held():
            lock_file.write_text(json.dumps({"holder": "pid 7 on elsewhere", "token": "theirs"}))
            time.sleep(0.5)
    assert json.loads(lock_file.read_text())["token"] == "theirs"


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
