"""Parquet files opened so that Arrow owns every buffer it reads: the one home of "open a Parquet file to read".

Why not ``pq.ParquetFile(python_file_object)``: over a Python file object (Beam's FileSystems, fsspec) Arrow's
buffers hold Python objects, and Arrow's I/O and CPU thread pools take part in even a "single-threaded" read, so a
pool thread can drop the last of those objects just after the read returned. Dropping it needs the GIL; if the
interpreter is exiting by then, CPython ends the thread inside a C++ destructor and the process aborts with SIGABRT
("terminate called without an active exception") after its work is done. Seen in about 1 in 16 runs of
``spatext verify`` (core dumps: ``PyReadableFile`` / ``PyBuffer`` destructors on Arrow pool threads, main thread in
``Py_FinalizeEx``); 0 in 450 runs once the reads went through Arrow-owned files and memory.

Local paths are opened by Arrow itself (no copy); other filesystems are read whole into Arrow-owned memory, one
file at a time (shards are ``--target-shard-mb``). Readers that must stream big remote files (the corpus reader, the
training loader) use ``streaming_source`` / ``streaming_parquet``: local paths natively, a Python handle only for
remote ones.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import IO, Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq

Opener = Callable[[str], AbstractContextManager[IO[bytes]]]


def local_path(path: str) -> str | None:
    """The local filesystem path of a plain path or a ``file://`` URL; None for any other scheme."""
    if path.startswith("file://"):
        return unquote(urlparse(path).path)
    if "://" in path:
        return None
    return os.path.abspath(path)


def _beam_open(path: str) -> AbstractContextManager[IO[bytes]]:
    from apache_beam.io.filesystems import FileSystems  # lazy: the model package reads through fsspec

    return FileSystems.open(path)


def read_into_arrow(path: str, opener: Opener | None = None) -> pa.Buffer:
    """The whole file at ``path`` (read through ``opener``; default Beam's FileSystems) as an Arrow-owned buffer,
    read straight into it when the handle can seek (one copy of the file in memory, not two)."""
    with (opener or _beam_open)(path) as handle:
        try:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(0)
        except (AttributeError, OSError, ValueError):  # not seekable: read, then copy
            size = None
        if size is None:
            data = handle.read()
            buffer = pa.allocate_buffer(len(data))
            memoryview(buffer).cast("B")[:] = data
            return buffer
        buffer = pa.allocate_buffer(size)
        view, filled = memoryview(buffer).cast("B"), 0
        while filled < size:
            chunk = handle.readinto(view[filled:]) if hasattr(handle, "readinto") else None
            if chunk is None:  # no readinto: copy what read() gives
                data = handle.read(size - filled)
                chunk = len(data)
                view[filled : filled + chunk] = data
            if not chunk:
                raise OSError(f"{path}: file ended after {filled} of {size} bytes")
            filled += chunk
    return buffer


def parquet_file(path: str, opener: Opener | None = None, **options: Any) -> pq.ParquetFile:
    """A ``pq.ParquetFile`` that reads only Arrow-owned files and memory: local paths natively, anything else read
    whole through ``opener`` (default Beam's FileSystems.open; pass an fsspec opener for fsspec storage).
    ``options`` go to ``pq.ParquetFile`` (e.g. ``page_checksum_verification=True``)."""
    local = local_path(path)
    if local is not None:
        return pq.ParquetFile(local, **options)
    return pq.ParquetFile(pa.BufferReader(read_into_arrow(path, opener)), **options)


@contextlib.contextmanager
def streaming_source(path: str, opener: Opener | None = None) -> Iterator[str | IO[bytes]]:
    """What ``pq.ParquetFile`` should read for a file too big to read whole: a local path itself (Arrow opens it),
    anything else a handle from ``opener`` (default Beam's FileSystems.open) that streams; the exit race above
    remains there, only right after a remote read."""
    local = local_path(path)
    if local is not None:
        yield local
        return
    with (opener or _beam_open)(path) as handle:
        yield handle


@contextlib.contextmanager
def streaming_parquet(path: str, opener: Opener | None = None) -> Iterator[pq.ParquetFile]:
    """``pq.ParquetFile`` over ``streaming_source``, closed on exit."""
    with streaming_source(path, opener) as source, pq.ParquetFile(source) as parquet:
        yield parquet
