"""One spatext process per output folder: an exclusive lock held while a build or a training run writes there.

Two launches on one folder (a relaunch by a scheduler while the first job still runs, a command typed twice) both ran
to the end before, interleaving their files: a build's settings file disagreed with its shards, a run's loss log held
every step twice.

- Local folders: the kernel's lock (``flock`` on FOLDER/.spatext.lock), so it goes with the process: a killed run
  leaves none behind.
- Remote folders (gs://, s3://, any filesystem Beam writes): a lease (``RemoteLease``). The holder writes
  FOLDER/.spatext.lock with a token of its own, reads it back after ``SETTLE_S`` (of two launches that wrote at once,
  the later write wins and the other one backs off), and rewrites it every ``HEARTBEAT_S``. A lock that nobody
  rewrote for ``STALE_AFTER_S`` is a dead launcher's, and the next launch takes it over. Object stores have no
  lock that ends with a process, so a launcher killed while its runner's job goes on (a Dataflow job outlives the
  command that started it) leaves a lock that goes stale in ``STALE_AFTER_S``: cancel that job before relaunching.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

LOCK_FILE = ".spatext.lock"
STALE_AFTER_S = 600.0  # a remote lock not rewritten for this long belongs to a launcher that is gone
HEARTBEAT_S = 60.0  # how often the holder of a remote lock rewrites it
SETTLE_S = 2.0  # wait between writing a remote lock and reading it back (two launches at once: the later write wins)

logger = logging.getLogger(__name__)


def is_remote(folder: str) -> bool:
    """Whether ``folder`` is on a remote filesystem (a URL other than file://)."""
    return "://" in folder and not folder.startswith("file://")


@contextlib.contextmanager
def folder_lock(folder: str, flag: str) -> Iterator[None]:
    """Hold the lock of `folder` for the block; ValueError naming `flag` when another process holds it (with what it
    wrote: its pid and host). Local folders are created if missing, and a block that fails in a folder this call
    created, before anything but the lock was written there, leaves no folder behind (removed while the lock is
    still held). Remote folders are locked by a ``RemoteLease``."""
    if is_remote(folder):
        with RemoteLease(folder, flag).held():
            yield
        return
    path = folder.removeprefix("file://")
    created = not os.path.exists(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, LOCK_FILE), "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "pid unknown"
            raise ValueError(f"{flag} {folder!r} is in use by another spatext process ({holder}): one build or "
                             "run per folder at a time; wait for it to end, or choose another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{holder_name()}\n")
        handle.flush()
        try:
            yield  # the lock ends when the file closes (or the process ends)
        except BaseException:
            if created and os.listdir(path) == [LOCK_FILE]:  # ours, and nothing else written: no empty folder
                os.remove(os.path.join(path, LOCK_FILE))
                os.rmdir(path)
            raise


def holder_name() -> str:
    """How a lock names its holder in the message another launch gets."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


class RemoteLease:
    """The lock of a folder on a filesystem Beam writes (``apache_beam.io.filesystems``): a lock file holding this
    launch's token, rewritten by a heartbeat thread while held (see the module's docstring for the protocol).

    The check and the write are two requests, so two launches can both find the folder free; both write, and after
    ``settle_s`` each reads the file back: only the one whose token is there goes on. A holder whose heartbeat finds
    another token (it went unheard for ``stale_after_s``, and a new launch took the folder over) has lost the lock:
    it logs an error at once and ``held`` raises RuntimeError when its block ends, since both wrote there.
    """

    def __init__(self, folder: str, flag: str, stale_after_s: float | None = None, heartbeat_s: float | None = None,
                 settle_s: float | None = None) -> None:
        """The lease of ``folder`` (``flag`` names it in messages); timings left None take the module's values."""
        from apache_beam.io.filesystems import FileSystems  # lazy: Beam is the pipeline's, not every caller's

        stale_after_s = STALE_AFTER_S if stale_after_s is None else stale_after_s
        heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        settle_s = SETTLE_S if settle_s is None else settle_s
        if heartbeat_s >= stale_after_s:
            raise ValueError(f"heartbeat_s ({heartbeat_s}) must be below stale_after_s ({stale_after_s})")
        self.folder, self.flag = folder, flag
        self.path = FileSystems.join(folder, LOCK_FILE)
        self.stale_after_s, self.heartbeat_s, self.settle_s = stale_after_s, heartbeat_s, settle_s
        self.token = uuid.uuid4().hex
        self.lost: str | None = None  # what the heartbeat found instead of this token
        self._stop = threading.Event()

    @contextlib.contextmanager
    def held(self) -> Iterator[RemoteLease]:
        """Acquire the lease, keep it alive for the block, release it after; RuntimeError after a block that ran
        while the lease was lost."""
        self.acquire()
        beat = threading.Thread(target=self._heartbeat, name="spatext-lock-heartbeat", daemon=True)
        beat.start()
        try:
            yield self
        finally:
            self._stop.set()
            beat.join()
            try:
                self.release()
            except Exception as exc:  # any storage error: the lock goes stale on its own; the block's outcome stands
                logger.warning("%s %s: could not delete the lock (%s: %s); it is taken over %.0f s after its last "
                               "refresh, or delete %s", self.flag, self.folder, type(exc).__name__, exc,
                               self.stale_after_s, self.path)
        if self.lost:
            raise RuntimeError(f"{self.flag} {self.folder!r}: this process lost its lock while it ran ({self.lost}); "
                               "another process wrote there too: check the output (spatext verify) and rerun")

    def acquire(self) -> None:
        """Write the lock when the folder is free or its lock is stale; ValueError naming the holder otherwise."""
        found = self._read()
        if found is not None:
            record, age = found
            if age < self.stale_after_s:
                raise self._in_use(record, age)
            logger.warning("%s %s: taking over a stale lock (%s, not refreshed for %.0f s, more than %.0f s)",
                           self.flag, self.folder, _holder(record), age, self.stale_after_s)
        self._write()
        time.sleep(self.settle_s)
        found = self._read()
        if found is None or found[0].get("token") != self.token:  # another launch wrote after this one
            raise self._in_use(*(found or ({"holder": "a launch that has gone again"}, 0.0)))

    def release(self) -> None:
        """Delete the lock when it is still this launch's."""
        from spatext.paths import delete_files

        found = self._read()
        if found is not None and found[0].get("token") == self.token:
            delete_files([self.path])

    def _heartbeat(self) -> None:
        """Rewrite the lock every ``heartbeat_s`` while it holds this token; note a lost one and stop."""
        while not self._stop.wait(self.heartbeat_s):
            try:
                found = self._read()
                if found is None or found[0].get("token") != self.token:
                    self.lost = f"its lock file names {_holder(found[0]) if found else 'no holder: it was deleted'}"
                    logger.error("%s %s: lost the lock (%s); another spatext process may write there too",
                                 self.flag, self.folder, self.lost)
                    return
                self._write()
            except Exception as exc:  # any storage error: retried at the next beat, well before the lock goes stale
                logger.warning("%s %s: could not refresh the lock (%s: %s); trying again in %.0f s", self.flag,
                               self.folder, type(exc).__name__, exc, self.heartbeat_s)

    def _write(self) -> None:
        """Write (or rewrite) the lock file with this launch's holder name and token."""
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.create(self.path) as handle:
            handle.write(json.dumps({"holder": holder_name(), "token": self.token}).encode())

    def _read(self) -> tuple[dict, float] | None:
        """(the lock file's JSON object, or {} when it holds something else; seconds since it was last written), or
        None when there is no lock file."""
        from apache_beam.io.filesystems import FileSystems

        try:
            written = FileSystems.last_updated(self.path)  # the storage's clock: a launcher's own may be off
            with FileSystems.open(self.path) as handle:
                content = handle.read(4096)
        except OSError:  # Beam's BeamIOError is one: no lock file (or it went between the two requests)
            if FileSystems.exists(self.path):
                raise
            return None
        try:
            record = json.loads(content.decode())
        except (UnicodeDecodeError, ValueError):
            record = {}
        return (record if isinstance(record, dict) else {}), max(time.time() - written, 0.0)

    def _in_use(self, record: dict, age: float) -> ValueError:
        """The error a launch gets while another holds the folder."""
        return ValueError(
            f"{self.flag} {self.folder!r} is in use by another spatext process ({_holder(record)}, lock refreshed "
            f"{age:.0f} s ago): one build or run per folder at a time; wait for it to end, or choose another "
            f"folder. A lock not refreshed for {self.stale_after_s:.0f} s is taken over; if its process is gone for "
            f"sure, delete {self.path}")


def _holder(record: dict) -> str:
    """The holder a lock file's record names."""
    return str(record.get("holder") or "holder unknown")
