"""Parquet files read only through Arrow-owned files and memory (spatext.pipeline.parquet_files)."""

from __future__ import annotations

import os

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spatext.pipeline.parquet_files import (
    local_path,
    parquet_file,
    read_into_arrow,
    streaming_parquet,
    streaming_source,
)


def _table() -> pa.Table:
    return pa.table({"key": [f"k{i}" for i in range(50)], "value": list(range(50))})


def test_local_path_recognises_plain_paths_and_file_urls_only(tmp_path):
    assert local_path(str(tmp_path / "a.parquet")) == str(tmp_path / "a.parquet")
    assert local_path("relative/a.parquet") == os.path.abspath("relative/a.parquet")
    assert local_path("file:///data/my%20shards/a.parquet") == "/data/my shards/a.parquet"
    for remote in ("gs://bucket/a.parquet", "s3://b/a.parquet", "memory://x/a.parquet", "hdfs://h/a"):
        assert local_path(remote) is None


def test_local_files_are_opened_by_arrow_and_read_the_same(tmp_path):
    path = str(tmp_path / "a.parquet")
    pq.write_table(_table(), path, row_group_size=16)
    for name in (path, "file://" + path):
        parquet = parquet_file(name)
        assert parquet.num_row_groups == 4 and parquet.read().equals(_table())


def _memory_file(path: str):
    """`_table()` written to fsspec's memory filesystem at `path`; an opener that records what it opened, and that
    record."""
    with fsspec.filesystem("memory").open(path, "wb") as handle:
        pq.write_table(_table(), handle, row_group_size=16)
    opened = []

    def opener(url):
        opened.append(url)
        return fsspec.open(url, "rb")

    return opener, opened


def test_other_filesystems_are_read_whole_into_arrow_memory():
    opener, opened = _memory_file("/pf/a.parquet")
    parquet = parquet_file("memory://pf/a.parquet", opener=opener)
    assert opened == ["memory://pf/a.parquet"]
    assert parquet.read_row_group(1).equals(_table().slice(16, 16))
    buffer = read_into_arrow("memory://pf/a.parquet", opener=opener)
    assert isinstance(buffer, pa.Buffer) and buffer.is_mutable  # allocated by Arrow, not a view of Python bytes
    assert buffer.to_pybytes() == fsspec.filesystem("memory").cat_file("/pf/a.parquet")
    with pytest.raises(FileNotFoundError):
        parquet_file("memory://pf/missing.parquet", opener=opener)


class _Stream:
    """A handle without seek (or readinto): what some filesystems hand out."""

    def __init__(self, data: bytes, seekable: bool, readinto: bool) -> None:
        import io

        self._io, self._seekable = io.BytesIO(data), seekable
        if readinto:
            self.readinto = self._io.readinto

    def seek(self, offset: int, whence: int = 0) -> int:
        if not self._seekable:
            raise OSError("not seekable")
        return self._io.seek(offset, whence)

    def read(self, size: int = -1) -> bytes:
        return self._io.read(min(size, 7) if size > 0 else size)  # short reads, like a network stream

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


@pytest.mark.parametrize(("seekable", "readinto"), [(True, True), (True, False), (False, False)])
def test_read_into_arrow_with_any_handle(seekable, readinto):
    data = bytes(range(256)) * 5
    buffer = read_into_arrow("x://f", opener=lambda _: _Stream(data, seekable, readinto))
    assert buffer.to_pybytes() == data and buffer.is_mutable


def test_read_into_arrow_refuses_a_file_shorter_than_its_size():
    class _Truncated(_Stream):
        def seek(self, offset: int, whence: int = 0) -> int:
            return 1290 if whence == os.SEEK_END else super().seek(offset, whence)  # 10 bytes more than it holds

    with pytest.raises(OSError, match="file ended after 1280 of 1290 bytes"):
        read_into_arrow("x://f", opener=lambda _: _Truncated(bytes(range(256)) * 5, True, False))


def test_streaming_reads_local_files_natively_and_remote_ones_through_the_opener(tmp_path):
    local = str(tmp_path / "a.parquet")
    pq.write_table(_table(), local, row_group_size=16)
    opener, opened = _memory_file("/st/a.parquet")
    with streaming_source(local, opener) as source:
        assert source == local  # Arrow opens it: no Python file object
    with streaming_source("memory://st/a.parquet", opener) as source:
        assert not isinstance(source, str) and source.read(4) == b"PAR1"
    assert opened == ["memory://st/a.parquet"]
    for path in (local, "memory://st/a.parquet"):
        with streaming_parquet(path, opener) as parquet:
            assert parquet.read_row_group(2).equals(_table().slice(32, 16))
