"""One spatext process per output folder: an exclusive lock held while a build or a training run writes there.

Two launches on one folder (a relaunch by a scheduler while the first job still runs, a command typed twice) both ran
to the end before, interleaving their files: a build's settings file disagreed with its shards, a run's loss log held
every step twice.

- Local folders: the kernel's lock (``flock`` on FOLDER/.spatext.lock), so it goes with the process: a killed run
  leaves none behind.
- Remote folders (gs://, s3://, any filesystem Beam writes): claims (``RemoteLease``). A launch writes a claim file of
  its own, FOLDER/.spatext.lock.TOKEN, then lists the claims: if any other is live it withdraws its own and is
  refused. No file is ever overwritten by another launch, so of two launches at once the one whose claim landed
  second sees the first's (object stores list what was written before), however slow either write was: at most one
  goes on (both may withdraw, when each lists while the other's claim is there). The holder rewrites its claim every
  ``HEARTBEAT_S``. A claim not rewritten for ``STALE_AFTER_S`` (the new claim's time on the store against the old
  one's, never a launcher's clock), and still not rewritten 1.5 heartbeats later, is a dead launcher's: the next
  launch deletes it and goes on. Object stores have no lock that ends with a process, so a launcher killed while its
  runner's job goes on (a Dataflow job outlives the command that started it) leaves a claim that goes stale in
  ``STALE_AFTER_S``: cancel that job before relaunching.
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
    """The lock of a folder on a filesystem Beam writes (``apache_beam.io.filesystems``): this launch's claim file,
    rewritten by a heartbeat thread while held (see the module's docstring for the protocol).

    A holder has lost the lock when its claim is gone (a launch took it for a dead one's: it went unheard for
    ``stale_after_s``) or when another claim keeps being rewritten beside it (a holder it did not see): it logs an
    error at once and ``held`` raises RuntimeError when its block ends, since both wrote there.
    """

    def __init__(self, folder: str, flag: str, stale_after_s: float | None = None,
                 heartbeat_s: float | None = None) -> None:
        """The lease of ``folder`` (``flag`` names it in messages); timings left None take the module's values."""
        from apache_beam.io.filesystems import FileSystems  # lazy: Beam is the pipeline's, not every caller's

        self.stale_after_s = STALE_AFTER_S if stale_after_s is None else stale_after_s
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        if self.heartbeat_s * 2 >= self.stale_after_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be below half of stale_after_s "
                             f"({self.stale_after_s})")
        self.folder, self.flag = folder, flag
        self.token = uuid.uuid4().hex
        self.path = FileSystems.join(folder, f"{LOCK_FILE}.{self.token}")
        self.lost: str | None = None  # why the heartbeat or the release found the lock no longer this launch's
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
            except Exception as exc:  # any storage error: the claim goes stale on its own; the block's outcome stands
                logger.warning("%s %s: could not delete the lock (%s: %s); it is taken over %.0f s after its last "
                               "refresh, or delete %s", self.flag, self.folder, type(exc).__name__, exc,
                               self.stale_after_s, self.path)
        if self.lost:
            raise RuntimeError(f"{self.flag} {self.folder!r}: this process lost its lock while it ran ({self.lost}); "
                               "another process may have written there too: check the output (spatext verify) and "
                               "rerun")

    def acquire(self) -> None:
        """Claim the folder; ValueError naming the holder when another live claim is there (this claim withdrawn).
        Stale claims are deleted once a second listing, ``1.5 * heartbeat_s`` later, shows them not rewritten: a
        holder beats in that time, whatever the store's timestamps say (GCS's, converted by Beam through the local
        time zone, jump by an hour across a change of summer time)."""
        self._write()
        try:
            claims = self._claims()
            mine = claims.pop(self.path, None)
            if mine is None:
                raise OSError(f"the claim {self.path} just written is not listed")
            self._refuse_live({p: mine - t for p, t in claims.items() if mine - t < self.stale_after_s})
            if claims:
                logger.warning("%s %s: %d lock(s) not refreshed for %.0f s or more; checking for %.0f s that nobody "
                               "refreshes them", self.flag, self.folder, len(claims), self.stale_after_s,
                               1.5 * self.heartbeat_s)
                time.sleep(1.5 * self.heartbeat_s)
                now = self._claims()
                self._refuse_live({p: 0.0 for p, t in now.items() if p != self.path and claims.get(p) != t})
            for path, written in claims.items():
                logger.warning("%s %s: taking over a stale lock (%s, not refreshed for %.0f s, more than %.0f s)",
                               self.flag, self.folder, self._holder(path), mine - written, self.stale_after_s)
                _delete(path)
        except BaseException:
            try:
                _delete(self.path)  # withdrawn: a refused or interrupted launch leaves no claim behind
            except Exception as exc:  # any storage error: say which claim is left, keep the original error
                logger.warning("%s %s: could not withdraw this launch's claim (%s: %s): delete %s", self.flag,
                               self.folder, type(exc).__name__, exc, self.path)
            raise

    def _refuse_live(self, live: dict[str, float]) -> None:
        """ValueError naming the most recently refreshed of ``live`` (claim -> seconds since refreshed), if any."""
        if live:
            path, age = min(live.items(), key=lambda item: item[1])
            raise ValueError(
                f"{self.flag} {self.folder!r} is in use by another spatext process ({self._holder(path)}, lock "
                f"refreshed {max(age, 0):.0f} s ago): one build or run per folder at a time; wait for it to end, "
                f"or choose another folder. A lock not refreshed for {self.stale_after_s:.0f} s is taken over; "
                f"if its process is gone for sure, delete {path}")

    def release(self) -> None:
        """Delete this launch's claim; a claim already gone means the lock was lost (``lost``)."""
        if not _exists(self.path):
            self.lost = self.lost or "its lock file was deleted: a launch took it for a dead one's"
            return
        _delete(self.path)

    def _heartbeat(self) -> None:
        """Rewrite the claim every ``heartbeat_s``; note a lost lock: the claim deleted (taken for a dead one's) or
        another claim rewritten beside it (a holder this launch did not see). A holder that lost its lock goes on
        rewriting its claim (re-created if deleted) until its block ends: that is how the other holder finds out."""
        seen: dict[str, float] = {}  # other claims at the last beat, and when they were written
        while not self._stop.wait(self.heartbeat_s):
            try:
                lost = None if _exists(self.path) else "its lock file was deleted: a launch took it for a dead one's"
                self._write()
                others = self._claims()
                others.pop(self.path, None)
                rewritten = [p for p, t in others.items() if p in seen and t > seen[p]]
                if rewritten and lost is None:
                    lost = f"another holder rewrites its lock beside this one's: {self._holder(rewritten[0])}"
                seen = others
                if lost and not self.lost:
                    self.lost = lost
                    logger.error("%s %s: lost the lock (%s); another spatext process may write there too",
                                 self.flag, self.folder, self.lost)
            except Exception as exc:  # any storage error: retried at the next beat, well before the lock goes stale
                logger.warning("%s %s: could not refresh the lock (%s: %s); trying again in %.0f s", self.flag,
                               self.folder, type(exc).__name__, exc, self.heartbeat_s)

    def _write(self) -> None:
        """Write (or rewrite) this launch's claim: its holder name and token."""
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.create(self.path) as handle:
            handle.write(json.dumps({"holder": holder_name(), "token": self.token, "lost": bool(self.lost)}).encode())

    def _claims(self) -> dict[str, float]:
        """Every claim in the folder (this launch's too) and when the store last wrote it (its own clock)."""
        from spatext.paths import match_in

        return {m.path: m.last_updated_in_seconds for m in match_in(self.folder, f"{LOCK_FILE}.*")}

    @staticmethod
    def _holder(path: str) -> str:
        """The holder a claim names ('holder unknown' when it cannot be read: gone meanwhile, or not ours)."""
        from apache_beam.io.filesystems import FileSystems

        try:
            with FileSystems.open(path) as handle:
                record = json.loads(handle.read(4096).decode())
            return str(record.get("holder") or "holder unknown")
        except Exception:  # any storage or format error: the message names the file, which is what matters
            return "holder unknown"


def _exists(path: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.exists(path)


def _delete(path: str) -> None:
    """Delete ``path`` when it is there (another launch may have deleted it first)."""
    from spatext.paths import delete_files

    if _exists(path):
        try:
            delete_files([path])
        except Exception:  # any storage error: fine only if it is gone anyway
            if _exists(path):
                raise


