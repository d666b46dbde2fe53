"""One spatext process per output folder: an exclusive lock held while a build or a training run writes there.

Two launches on one folder (a relaunch by a scheduler while the first job still runs, a command typed twice) both ran
to the end before, interleaving their files: a build's settings file disagreed with its shards, a run's loss log held
every step twice. The lock is the kernel's (``flock`` on FOLDER/.spatext.lock), so it goes with the process: a killed
run leaves none behind. Remote folders (gs://, s3://) have no such lock and are not locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator

LOCK_FILE = ".spatext.lock"


@contextlib.contextmanager
def folder_lock(folder: str, flag: str) -> Iterator[None]:
    """Hold the lock of local `folder` (created if missing) for the block; ValueError naming `flag` when another
    process holds it (with what it wrote: its pid and host). A block that fails in a folder this call created, before
    anything but the lock was written there, leaves no folder behind (removed while the lock is still held)."""
    if "://" in folder and not folder.startswith("file://"):
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
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        try:
            yield  # the lock ends when the file closes (or the process ends)
        except BaseException:
            if created and os.listdir(path) == [LOCK_FILE]:  # ours, and nothing else written: no empty folder
                os.remove(os.path.join(path, LOCK_FILE))
                os.rmdir(path)
            raise
