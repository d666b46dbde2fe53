"""Where a ShardDataset's rows live: shard discovery on any fsspec path, footers and metadata checks, work units
(row ranges of row groups) split across ranks and DataLoader workers, and reading a unit's columns (see data.py, steps
1-2)."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from spatext.paths import escape_glob
from spatext.pipeline.parquet_files import streaming_parquet
from spatext.pipeline.schema import SCHEMA_VERSION, read_metadata
from spatext.pipeline.write import SHARDS_DIR, SUFFIX

logger = logging.getLogger(__name__)

READ_COLUMNS = ["key", "caption", "image", "segment_map", "segments", "image_embedding", "caption_embedding"]


@dataclass(frozen=True)
class WorkUnit:
    """Rows [start, stop) of one row group of one Parquet file."""

    path: str
    row_group: int
    start: int
    stop: int

    @property
    def num_rows(self) -> int:
        """Rows in the unit."""
        return self.stop - self.start


def _has_magic(path: str) -> bool:
    """Whether a path is a glob pattern."""
    return any(c in path for c in "*?[")


def _glob(data: str, storage_options: dict) -> list[str]:
    """The Parquet files one path names: a build dir, a glob or a file (full URLs, sorted)."""
    fs, path = url_to_fs(data, **storage_options)
    if fs.isdir(path):  # a build dir (its shards/ folder), or else a folder of Parquet files
        root = escape_glob(path.rstrip("/"))  # a folder named 'run[1]' is a folder, not a pattern
        found = fs.glob(f"{root}/{SHARDS_DIR}/*{SUFFIX}") or fs.glob(f"{root}/*{SUFFIX}")
    elif fs.exists(path):
        found = [path]
    elif _has_magic(path):
        found = fs.glob(path)
    else:
        raise ValueError(f"data={data!r} does not exist (expected a build dir, a glob or a Parquet file)")
    if "://" not in data:  # keep plain local paths plain
        return sorted(found)
    return sorted(fs.unstrip_protocol(p) for p in found)


def _canonical(path: str) -> str:
    """One spelling per local file (a plain path, relative or absolute, and its file:// URL), for deduplication."""
    if "://" not in path:
        return "file://" + os.path.abspath(path)
    if path.startswith("file://"):
        return "file://" + os.path.abspath(path[len("file://"):])
    return path


def resolve_files(data: str | list[str], storage_options: dict | None = None) -> list[str]:
    """Parquet files of `data`: a build dir (DIR/shards/*.parquet), a folder of Parquet files, a glob, a file, or a
    list of those; sorted, deduplicated (a file named twice, e.g. as a path and as a file:// URL, is read once).
    An existing path is taken as it is, glob characters and all."""
    items = [data] if isinstance(data, str) else list(data)
    if not items:
        raise ValueError("data is an empty list; pass a build dir, a glob or Parquet paths")
    files: list[str] = []
    seen: set[str] = set()
    for item in items:
        for found in _glob(item, storage_options or {}):
            if _canonical(found) not in seen:
                seen.add(_canonical(found))
                files.append(found)
    if not files:
        raise ValueError(f"data={data!r} matched no Parquet shards")
    return files


def open_shard(path: str, storage_options: dict | None = None) -> AbstractContextManager[pq.ParquetFile]:
    """A shard for reading row groups (``streaming_parquet`` through fsspec)."""
    return streaming_parquet(path, opener=lambda p: fsspec.open(p, "rb", **(storage_options or {})))


def _footer(path: str, storage_options: dict) -> tuple[list[int], dict[str, str]]:
    """Rows per row group and the spatext metadata of one file; ValueError naming a file that is no Parquet."""
    try:
        with open_shard(path, storage_options) as parquet:
            meta = parquet.metadata
            rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            return rows, read_metadata(meta.schema.to_arrow_schema())
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet shard ({exc})") from exc


def read_footers(files: list[str], storage_options: dict | None = None) -> list[tuple[list[int], dict[str, str]]]:
    """Footers of many files, read in parallel threads (object stores are latency-bound)."""
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(files)))) as pool:
        return list(pool.map(lambda f: _footer(f, storage_options or {}), files))


def check_metadata(data: object, metas: list[dict[str, str]]) -> dict[str, str]:
    """The first file's metadata, after checking that all files are schema v1 with one embed_dim."""
    versions = {m.get("schema_version") for m in metas}
    if versions != {SCHEMA_VERSION}:
        raise ValueError(f"data={data!r}: shards have schema versions {sorted(map(str, versions))}, "
                         f"this reader reads {SCHEMA_VERSION!r}")
    dims = {m.get("embed_dim") for m in metas}
    if len(dims) != 1 or None in dims:
        raise ValueError(f"data={data!r}: shards declare embed_dim {sorted(map(str, dims))}; need one value")
    return dict(metas[0])


def row_slice(units: list[WorkUnit], part: int, parts: int) -> list[WorkUnit]:
    """Part `part` of `parts` equal row ranges of the units laid end to end (rows [part*N//parts, (part+1)*N//parts)
    of N), as units: a boundary inside a row group cuts it into two pieces, read by the two consumers."""
    total = sum(unit.num_rows for unit in units)
    low, high = part * total // parts, (part + 1) * total // parts
    out, offset = [], 0
    for unit in units:
        start, stop = max(low, offset), min(high, offset + unit.num_rows)
        if start < stop:
            out.append(replace(unit, start=unit.start + start - offset, stop=unit.start + stop - offset))
        offset += unit.num_rows
        if offset >= high:
            break
    return out


def assign_units(
    units: list[WorkUnit], *, seed: int, epoch: int, rank: int, world_size: int, worker: int, num_workers: int,
    shuffle: bool = True,
) -> list[WorkUnit]:
    """The units one (rank, worker) reads this epoch: the units in a (seed, epoch) permutation, laid end to end and
    cut into world_size equal row ranges, one per rank; each rank's range cut again into one per worker. Ranks and
    workers get the same number of rows to within one, whatever the shard and row-group sizes."""
    order = np.random.default_rng([seed, epoch]).permutation(len(units)) if shuffle else np.arange(len(units))
    mine = row_slice([units[i] for i in order], rank, world_size)
    return row_slice(mine, worker, num_workers)


def fixed_lists(column: pa.ChunkedArray, rows: int) -> np.ndarray:
    """A list<float16> column of equal-length lists -> rows x D float16."""
    values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    if rows and values.size % rows:
        raise ValueError(f"embedding column has ragged lists ({values.size} values for {rows} rows)")
    return values.reshape(rows, -1) if rows else values.reshape(0, 0)


def table_rows(table: pa.Table) -> list[dict]:
    """Raw rows of a shard table (bytes still encoded, embeddings float16 arrays), without per-value Python lists."""
    n = table.num_rows
    segments = table.column("segments").combine_chunks()
    counts = segments.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    fields = dict(zip([f.name for f in segments.type.value_type], segments.flatten().flatten(), strict=True))
    seg_index = fields["index"].to_numpy(zero_copy_only=False).astype(np.int64)
    seg_emb = fixed_lists(pa.chunked_array([fields["embedding"]]), len(seg_index))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    image_emb = fixed_lists(table.column("image_embedding"), n)
    caption_emb = fixed_lists(table.column("caption_embedding"), n)
    keys, captions = table.column("key").to_pylist(), table.column("caption").to_pylist()
    images, maps = table.column("image").to_pylist(), table.column("segment_map").to_pylist()
    return [
        {
            "key": keys[i], "caption": captions[i], "image": images[i], "segment_map": maps[i],
            "segment_index": seg_index[bounds[i] : bounds[i + 1]],
            "segment_embeddings": seg_emb[bounds[i] : bounds[i + 1]],
            "image_embedding": image_emb[i], "caption_embedding": caption_emb[i],
        }
        for i in range(n)
    ]


def read_unit(unit: WorkUnit, storage_options: dict | None = None, columns: list[str] | None = None) -> pa.Table:
    """The rows of one work unit as a table; ValueError naming the shard and row group when they cannot be read (a
    damaged page, a missing column), so that one bad file among thousands can be found."""
    try:
        with open_shard(unit.path, storage_options) as parquet:
            table = parquet.read_row_group(unit.row_group, columns=columns or READ_COLUMNS)
    except (pa.ArrowException, OSError, KeyError) as exc:
        raise ValueError(f"{unit.path}: row group {unit.row_group} cannot be read ({exc})") from exc
    missing = [name for name in columns or READ_COLUMNS if name not in table.column_names]
    if missing:  # pyarrow reads the columns it finds and skips the rest
        raise ValueError(f"{unit.path}: row group {unit.row_group} has no column {', '.join(missing)}")
    if unit.start or unit.stop < table.num_rows:
        table = table.slice(unit.start, unit.num_rows)
    return table
