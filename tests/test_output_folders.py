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
from remote_fs import RemoteTestFileSystem

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


def _wait_for(condition, timeout: float = 20.0) -> None:
    """Poll until ``condition()`` holds (heartbeats run on threads: a loaded machine delays them), or fail."""
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture
def remote(tmp_path, monkeypatch):
    """A remote folder URL (``spatexttest://build``) whose files lie in tmp_path/build, and a function listing the
    claim files there."""
    monkeypatch.setattr(RemoteTestFileSystem, "root", str(tmp_path))
    folder = tmp_path / "build"

    def claims() -> list:
        return sorted(folder.glob(f"{LOCK_FILE}.*")) if folder.exists() else []

    return "spatexttest://build", claims


def test_a_remote_folder_is_locked_by_a_claim_that_its_holder_refreshes_and_deletes(remote) -> None:
    url, claims = remote
    lease = locks.RemoteLease(url, "--output", heartbeat_s=0.1)
    with lease.held():
        [claim] = claims()
        assert claim.name == f"{LOCK_FILE}.{lease.token}"
        assert json.loads(claim.read_text()) == {"holder": f"pid {os.getpid()} on {socket.gethostname()}",
                                                 "token": lease.token, "lost": False}
        # the launcher's own clock plays no part: an hour off, the live claim is still live
        with mock.patch("time.time", return_value=time.time() + 3600), \
                pytest.raises(ValueError, match=rf"--output '{url}' is in use by another spatext process \(pid "
                                                rf"{os.getpid()} on .*, lock refreshed \d+ s ago\): one build or run "
                                                rf"per folder.*delete {url}/{LOCK_FILE}\.{lease.token}"):
            with folder_lock(url, "--output"):
                pass
        assert claims() == [claim]  # the refused launch withdrew its own claim
        os.utime(claim, (0, 0))  # the heartbeat rewrites it: its time moves on
        _wait_for(lambda: time.time() - claim.stat().st_mtime < 5)
    assert claims() == [] and lease.lost is None
    with folder_lock(url, "--output"):  # released: the next launch gets the folder
        assert len(claims()) == 1
    assert claims() == []


def test_a_dead_holders_remote_claim_is_refused_until_stale_then_taken_over(remote, caplog) -> None:
    url, claims = remote
    locks.RemoteLease(url, "--output").acquire()  # a launcher killed while holding it: nothing refreshes or deletes it
    [dead] = claims()
    with pytest.raises(ValueError, match="is in use by another spatext process"):
        locks.RemoteLease(url, "--output", stale_after_s=60, heartbeat_s=1).acquire()
    os.utime(dead, (time.time() - 61, time.time() - 61))  # last written 61 s before the next claim
    taker = locks.RemoteLease(url, "--output", stale_after_s=60, heartbeat_s=1)
    with caplog.at_level("WARNING", logger="spatext.locks"), taker.held():
        assert [c.name for c in claims()] == [f"{LOCK_FILE}.{taker.token}"]  # the dead one's deleted
    assert "taking over a stale lock (pid" in caplog.text and "not refreshed for 61 s" in caplog.text
    assert claims() == []


def test_of_launches_whose_claims_all_land_before_any_looks_at_most_one_goes_on(remote, monkeypatch) -> None:
    """Each lists the claims only once all have written theirs: whoever lists while another's claim is there
    withdraws, so at most one goes on (one that lists after the others withdrew may). Whichever lands last in any
    other order sees the earlier ones: the first test."""
    url, claims = remote
    for launches in (2, 3, 2, 3):
        all_wrote = threading.Barrier(launches, timeout=10)
        listing = locks.RemoteLease._claims

        def claims_once_all_wrote(self: locks.RemoteLease, wait=all_wrote.wait, listing=listing) -> dict:
            wait()
            return listing(self)

        monkeypatch.setattr(locks.RemoteLease, "_claims", claims_once_all_wrote)
        leases = [locks.RemoteLease(url, "--output") for _ in range(launches)]
        outcomes: list[object] = [None] * launches

        def launch(i: int, leases=leases, outcomes=outcomes) -> None:
            try:
                leases[i].acquire()
                outcomes[i] = "holds"
            except ValueError as exc:
                outcomes[i] = exc

        threads = [threading.Thread(target=launch, args=(i,)) for i in range(launches)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        monkeypatch.setattr(locks.RemoteLease, "_claims", listing)
        holders = [lease for lease, o in zip(leases, outcomes, strict=True) if o == "holds"]
        assert len(holders) <= 1, outcomes
        assert all(o == "holds" or (isinstance(o, ValueError) and "is in use" in str(o)) for o in outcomes)
        assert [c.name for c in claims()] == [f"{LOCK_FILE}.{h.token}" for h in holders]  # the others withdrew
        for holder in holders:
            holder.release()
    with folder_lock(url, "--output"):  # a retry gets the folder
        pass


def test_a_stale_claim_rewritten_while_the_next_launch_checks_it_is_not_taken_over(remote) -> None:
    """Store times can mislead (GCS's jump by an hour at a change of summer time, converted by Beam): a claim is
    taken over only when a second listing, 1.5 heartbeats later, shows it not rewritten."""
    url, claims = remote
    holder = locks.RemoteLease(url, "--output")
    holder.acquire()
    [claim] = claims()
    os.utime(claim, (time.time() - 3600, time.time() - 3600))  # looks an hour old
    beat = threading.Timer(0.5, holder._write)  # but its holder beats meanwhile
    beat.start()
    with pytest.raises(ValueError, match="is in use by another spatext process"):
        locks.RemoteLease(url, "--output", stale_after_s=60, heartbeat_s=1).acquire()
    beat.join()
    assert claims() == [claim]


def test_a_launch_that_cannot_withdraw_its_claim_still_says_why_it_was_refused(remote, monkeypatch, caplog) -> None:
    url, claims = remote
    with locks.RemoteLease(url, "--output").held():
        newcomer = locks.RemoteLease(url, "--output")
        delete = locks._delete
        monkeypatch.setattr(locks, "_delete", lambda path: (_ for _ in ()).throw(OSError("storage down"))
                            if path == newcomer.path else delete(path))
        with caplog.at_level("WARNING", logger="spatext.locks"), pytest.raises(ValueError, match="is in use"):
            newcomer.acquire()
        assert f"could not withdraw this launch's claim (OSError: storage down): delete {newcomer.path}" in caplog.text
        monkeypatch.setattr(locks, "_delete", delete)
        delete(newcomer.path)


def test_a_holder_taken_for_dead_and_the_launch_that_took_over_both_fail(remote) -> None:
    """The taken one finds its claim deleted and goes on rewriting it (re-created): the taker sees a claim rewritten
    beside its own. Both wrote there, so both fail."""
    url, claims = remote
    victim, taker = (locks.RemoteLease(url, "--output", heartbeat_s=0.1) for _ in range(2))
    with pytest.raises(RuntimeError, match=r"its lock file was deleted"):
        with victim.held():
            claims()[0].unlink()  # as a launch does with a claim it took for a dead one's
            with pytest.raises(RuntimeError, match=r"another holder rewrites its lock beside this one's"):
                with taker.held():
                    _wait_for(lambda: victim.lost and taker.lost)
    assert claims() == []


def test_an_interrupted_launch_leaves_no_claim(remote, monkeypatch) -> None:
    url, claims = remote
    monkeypatch.setattr(locks.RemoteLease, "_claims", mock.Mock(side_effect=KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        locks.RemoteLease(url, "--output").acquire()
    assert claims() == []


def test_a_holder_whose_claim_was_deleted_fails_when_its_block_ends(remote) -> None:
    """Taken for a dead one's (it went unheard past the stale time): noticed by the heartbeat, or at the release
    when the block ends before the next beat."""
    url, claims = remote
    for heartbeat in (0.1, 30):
        with pytest.raises(RuntimeError, match=r"lost its lock while it ran \(its lock file was deleted"):
            with locks.RemoteLease(url, "--output", heartbeat_s=heartbeat).held():
                claims()[0].unlink()
                time.sleep(0.4 if heartbeat < 1 else 0)
        assert claims() == []


def test_a_holder_fails_when_another_claim_keeps_being_rewritten_beside_its_own(remote) -> None:
    """A holder it never saw (a takeover that raced its heartbeat): both write there, so both must fail."""
    url, claims = remote
    other = locks.RemoteLease(url, "--output")
    stop = threading.Event()

    def other_holder() -> None:
        while not stop.wait(0.05):
            other._write()

    with pytest.raises(RuntimeError, match=r"another holder rewrites its lock beside this one's: pid"):
        with locks.RemoteLease(url, "--output", heartbeat_s=0.15).held() as holder:
            writer = threading.Thread(target=other_holder)
            writer.start()
            try:
                _wait_for(lambda: holder.lost)
            finally:
                stop.set()
                writer.join()
    assert [c.name for c in claims()] == [f"{LOCK_FILE}.{other.token}"]
    # a claim left by a launch killed mid-way is not rewritten: it refuses new launches until stale, but a holder
    # that sees it beside its own goes on
    dead = claims()[0]
    os.utime(dead, (time.time() - 3600, time.time() - 3600))
    with locks.RemoteLease(url, "--output", heartbeat_s=0.1).held() as lease:
        dead.touch()
        os.utime(dead, (time.time() - 5, time.time() - 5))
        beats = lease._claims  # count the holder's listings: at least three beats see the dead claim
        listed = []
        lease._claims = lambda: listed.append(1) or beats()
        _wait_for(lambda: len(listed) >= 3)
    assert lease.lost is None


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
