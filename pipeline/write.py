"""Write stage and the one home of the output layout: per-unit Parquet shards, rejects, markers, manifest.

The unit of work is one input unit (a tar, or a chunk of a folder's captions.jsonl): its rows, its rejects and its
read count meet in a CoGroupByKey and are written together — shards split by target bytes, then a marker file in
`_units/`. A unit with a marker is complete, which is what `--resume` relies on: a killed run loses only the units
it had not finished, and file names are deterministic, so a retried or resumed unit rewrites the same files.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from spatext.paths import delete_files, match_in
from spatext.pipeline.dedupe import duplicate_reject
from spatext.pipeline.records import Reject
from spatext.pipeline.schema import REJECT_SCHEMA, reject_to_row

logger = logging.getLogger(__name__)

SHARDS_DIR = "shards"
REJECTS_DIR = "rejects"
UNITS_DIR = "_units"
MANIFEST = "manifest.json"
BUILD_CONFIG = "build_config.json"
SUFFIX = ".parquet"
TMP_SUFFIX = ".tmp"


# The names this module gives files (``unit_name``: a sanitised basename and 10 hex digits), with the temporary
# suffix of a write in progress: what --overwrite may delete and what a build may find in its own folders.
_UNIT = r"[A-Za-z0-9_.-]+-[0-9a-f]{10}"
OWN_FILES = {
    SHARDS_DIR: re.compile(_UNIT + r"-\d{5}\.parquet(\.tmp)?"),
    REJECTS_DIR: re.compile(_UNIT + r"\.parquet(\.tmp)?"),
    UNITS_DIR: re.compile(_UNIT + r"\.json(\.tmp)?"),
}


def unit_name(source: str) -> str:
    """A safe, stable file stem for an input unit: its readable basename plus a hash of the full source."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.rstrip("/").rsplit("/", 1)[-1])[-48:].strip("._") or "unit"
    return f"{base}-{hashlib.sha1(source.encode()).hexdigest()[:10]}"


def list_files(output: str, table: str = SHARDS_DIR, suffix: str = SUFFIX) -> list[str]:
    """The build's files of one table (shards, rejects, _units), sorted."""
    return sorted(m.path for m in match_in(output, table, f"*{suffix}"))


def list_parquet(output: str, table: str = SHARDS_DIR) -> list[str]:
    """The build's Parquet files of one table ('shards' or 'rejects'), sorted."""
    return list_files(output, table, SUFFIX)


def read_json(path: str) -> dict:
    """Load a JSON file from any Beam filesystem; FileNotFoundError when there is none (Beam's GCS filesystem raises
    google's NotFound, which is no OSError, where the local one raises an OSError)."""
    if not FileSystems.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    with FileSystems.open(path) as handle:
        return json.loads(handle.read())


def write_atomic(path: str, data: bytes) -> None:
    """Write bytes to `path` through a temporary name, so a reader never sees a partial file."""
    tmp = path + TMP_SUFFIX
    with FileSystems.create(tmp) as handle:
        handle.write(data)
    if FileSystems.exists(path):
        delete_files([path])
    FileSystems.rename([tmp], [path])


_MARKERS: dict[tuple[str, int, float], dict] = {}  # (path, size, mtime) -> marker: each marker file is read once


def read_markers(output: str) -> list[dict]:
    """The markers of all completed units of a build, sorted by file name. A launch lists them many times (resume
    checks, each --units-per-run job, the manifest): each file is read once per process, then served from memory
    while its size and modification time are unchanged (an --overwrite rewrites it, and it is read again)."""
    markers = []
    for meta in sorted(match_in(output, UNITS_DIR, "*.json"), key=lambda m: m.path):
        stamp = getattr(meta, "last_updated_in_seconds", None)
        key = (meta.path, meta.size_in_bytes, stamp)
        marker = _MARKERS.get(key) if stamp else None
        if marker is None:
            marker = read_json(meta.path)
            if stamp:
                if len(_MARKERS) > 200_000:
                    _MARKERS.clear()
                _MARKERS[key] = marker
        markers.append(marker)
    return markers


def completed_tables(output: str) -> list[tuple[str, str, str]]:
    """(unit, table, parquet file) of every file that the build's completed units wrote ('shards' / 'rejects')."""
    tables = []
    for marker in read_markers(output):
        tables += [(marker["source"], SHARDS_DIR, FileSystems.join(output, SHARDS_DIR, s)) for s in marker["shards"]]
        if marker.get("rejects"):
            tables.append((marker["source"], REJECTS_DIR, FileSystems.join(output, REJECTS_DIR, marker["rejects"])))
    return tables


def existing_build(output: str) -> bool:
    """Whether `output` already holds (part of) a spatext build: its build_config.json (written before anything
    else, so a second launch on the folder of a running build sees it), a unit marker, or a build manifest."""
    if FileSystems.exists(FileSystems.join(output, BUILD_CONFIG)) or own_files(output, UNITS_DIR):
        return True
    try:
        manifest = read_json(FileSystems.join(output, MANIFEST))
    except (OSError, ValueError):  # absent, or not JSON: not a build's manifest
        return False
    return isinstance(manifest, dict) and "counts" in manifest and "config" in manifest


def own_files(output: str, table: str) -> list[str]:
    """The files of `table` (shards, rejects, _units) named as a build names them (``OWN_FILES``), sorted."""
    return [p for p in list_files(output, table, "") if OWN_FILES[table].fullmatch(posixpath.basename(p))]


def foreign_files(output: str) -> list[str]:
    """Files in `output`'s shards/, rejects/ and _units/ that no build wrote: a build there would mix its files
    with them (readers take every Parquet file in shards/), and --overwrite does not delete them."""
    return [p for table in OWN_FILES for p in list_files(output, table, "")
            if not OWN_FILES[table].fullmatch(posixpath.basename(p))]


def clear_output(output: str) -> None:
    """Delete a previous build in `output` (for --overwrite): the files a build writes, and nothing else."""
    stale = [p for table in OWN_FILES for p in own_files(output, table)]
    singles = [FileSystems.join(output, name) for name in (MANIFEST, BUILD_CONFIG)]
    stale += [path for path in singles if FileSystems.exists(path)]
    if stale:
        delete_files(stale)


def unreferenced_files(output: str) -> list[str]:
    """A build's own shard and reject files that no unit marker lists: what a unit killed while writing left, which
    belongs to no completed unit (its redo rewrites it; a unit no longer in --input never does)."""
    listed = {posixpath.basename(path) for _, _, path in completed_tables(output)}
    return [p for table in (SHARDS_DIR, REJECTS_DIR) for p in own_files(output, table)
            if posixpath.basename(p) not in listed]


def input_file(source: str) -> str:
    """The file a unit reads: the unit itself (a tar, a Parquet file), or the file of a line or image range
    ('captions.jsonl#000003', 'panoptic_val2017.json#000001')."""
    return re.sub(r"#\d{6}$", "", source)


def input_stamp(source: str) -> dict:
    """Size and modification time of a unit's input file now ({} where the filesystem cannot say): a marker records
    them, and --resume compares, so a file replaced after its unit was built is not silently kept."""
    found = match_in(input_file(source))
    if not found:
        return {}
    meta = found[0]
    mtime = getattr(meta, "last_updated_in_seconds", None)
    return {"input_size": meta.size_in_bytes, **({"input_mtime": mtime} if mtime else {})}


# Columns of encoded images: Parquet's min/max statistics of them (kept for small blobs such as segment maps, in
# every page header and in the footer) and dictionaries of them help no reader and cost bytes. Without them a row
# group costs ~1.3 KB beyond its rows (page headers and column-chunk metadata of the 14 leaf columns; measured on the
# demo corpus), where a 3.6 KB segment map used to add ~16 KB.
BLOB_COLUMNS = ("image", "segment_map")
ROW_GROUP_BYTES = 2048  # estimated bytes a row group adds beyond its rows (see above; rounded up)


def row_bytes(row: dict) -> int:
    """Approximate stored size of a row: encoded image and map plus float16 embeddings."""
    dims = len(row["image_embedding"]) * (2 + len(row["segments"]))
    return len(row["image"]) + len(row["segment_map"]) + 2 * dims + len(row["caption"]) + 64


def split_by_bytes(
    rows: list[dict], target_bytes: int, rows_per_group: int | None = None, file_bytes: int = 0
) -> list[list[dict]]:
    """Consecutive groups of rows, each at most `target_bytes` (estimated) unless a single row is larger.

    The estimate of a group is `file_bytes` (a file's fixed cost: its footer) plus its rows' `row_bytes` plus
    ROW_GROUP_BYTES per Parquet row group of `rows_per_group` rows (None: row groups are not counted)."""

    def opens_row_group(count: int) -> int:  # the cost of a row group when the next row starts one
        return ROW_GROUP_BYTES if rows_per_group is not None and count % rows_per_group == 0 else 0

    groups: list[list[dict]] = [[]]
    size = file_bytes
    for row in rows:
        nbytes = row_bytes(row)
        if groups[-1] and size + nbytes + opens_row_group(len(groups[-1])) > target_bytes:
            groups.append([])
            size = file_bytes
        size += nbytes + opens_row_group(len(groups[-1]))
        groups[-1].append(row)
    return [g for g in groups if g]


def leaf_columns(schema: pa.Schema) -> list[str]:
    """The Parquet leaf column paths of an Arrow schema ('segments.list.element.bbox.list.element', ...): the names
    pyarrow's per-column writer options match (a top-level name does not reach a nested leaf)."""

    def leaves(name: str, dtype: pa.DataType) -> list[str]:
        if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
            return leaves(f"{name}.list.element", dtype.value_type)
        if pa.types.is_struct(dtype):
            return [p for i in range(dtype.num_fields) for p in leaves(f"{name}.{dtype.field(i).name}",
                                                                        dtype.field(i).type)]
        return [name]

    return [p for field in schema for p in leaves(field.name, field.type)]


def _parquet_bytes(rows: list[dict], schema: pa.Schema, rows_per_group: int) -> bytes:
    """Rows -> a zstd Parquet file's bytes (row groups of `rows_per_group` rows).

    Every page carries a CRC-32 (`write_page_checksum`): a flipped bit in a stored image is otherwise invisible, as
    images are incompressible and zstd stores them raw; `spatext verify` checks the CRCs. BLOB_COLUMNS get neither
    statistics nor a dictionary (see there)."""
    buffer = io.BytesIO()
    table = pa.Table.from_pylist(rows, schema=schema)
    small = [c for c in leaf_columns(schema) if c not in BLOB_COLUMNS]
    pq.write_table(table, buffer, compression="zstd", row_group_size=rows_per_group, write_page_checksum=True,
                   write_statistics=small, use_dictionary=small)
    return buffer.getvalue()


def encode_shards(rows: list[dict], schema: pa.Schema, target_bytes: int, rows_per_group: int) -> Iterator[bytes]:
    """Consecutive rows -> the bytes of Parquet files, in order, each at most `target_bytes` unless it holds a single
    row; one file at a time, so a unit's encoded shards are never all in memory together.

    Rows are grouped by an estimate (`split_by_bytes`, with the footer measured on an empty file); a group whose
    encoding still exceeds the target is cut where its measured bytes per row say the target falls, and both parts
    are encoded again. Every step is a pure function of the rows, so a retried or resumed unit writes the same
    files."""
    footer = len(_parquet_bytes([], schema, rows_per_group))
    pending = split_by_bytes(rows, target_bytes, rows_per_group, footer)[::-1]  # a stack: first group on top
    while pending:
        group = pending.pop()
        data = _parquet_bytes(group, schema, rows_per_group)
        if len(data) <= target_bytes or len(group) == 1:
            yield data
            continue
        keep = max(1, min(len(group) - 1, len(group) * target_bytes // len(data)))
        pending += [group[keep:], group[:keep]]


class _WriteUnit(beam.DoFn):
    """(source, {rows, rejects, read}) -> shard files, a rejects file, and the unit's marker (also yielded)."""

    def __init__(self, output: str, schema: pa.Schema, target_bytes: int, rows_per_group: int) -> None:
        self.output, self.schema = output, schema
        self.target_bytes, self.rows_per_group = target_bytes, rows_per_group
        self.units = beam.metrics.Metrics.counter("spatext_write", "units_written")
        self.shards = beam.metrics.Metrics.counter("spatext_write", "shards_written")
        self.mismatches = beam.metrics.Metrics.counter("spatext_write", "unit_count_mismatches")

    def process(self, element: tuple[str, dict], winners: dict[str, str] | None = None) -> Iterator[dict]:
        """Write one unit; a copy of a key that `winners` assigns to another unit becomes a duplicate_key reject,
        whether it was accepted or rejected at a later stage (a decode failure of the losing copy is not its reason
        for leaving: it lost at read, and only read-stage rejects tell a resume that this unit does not hold it)."""
        source, grouped = element
        name = unit_name(source)
        winners = winners or {}
        rows, rejects = [], []
        for row in grouped["rows"]:
            first = winners.get(row["key"], source)
            if first == source:
                rows.append(row)
            else:
                rejects.append(duplicate_reject(row["key"], source, first))
        for reject in grouped["rejects"]:  # read-stage rejects never took part in the choice of winners
            first = source if reject.stage == "read" else winners.get(reject.key, source)
            rejects.append(reject if first == source else duplicate_reject(reject.key, source, first))
        rows.sort(key=lambda r: r["key"])
        rejects.sort(key=lambda r: (r.key, r.stage, r.reason))
        shard_names = []
        for i, data in enumerate(encode_shards(rows, self.schema, self.target_bytes, self.rows_per_group)):
            shard_names.append(f"{name}-{i:05d}{SUFFIX}")
            write_atomic(FileSystems.join(self.output, SHARDS_DIR, shard_names[-1]), data)
        reject_name = None
        if rejects:
            reject_name = f"{name}{SUFFIX}"
            data = _parquet_bytes([reject_to_row(r) for r in rejects], REJECT_SCHEMA, 4096)
            write_atomic(FileSystems.join(self.output, REJECTS_DIR, reject_name), data)
        remove_stale_files(self.output, name, shard_names, reject_name)
        marker = unit_marker(source, sum(grouped["read"]), len(rows), rejects, shard_names, reject_name)
        marker.update(input_stamp(source))
        if marker["read"] != marker["accepted"] + marker["rejected"]:
            self.mismatches.inc()
            logger.error("unit %s: read %d != accepted %d + rejected %d", source, marker["read"],
                         marker["accepted"], marker["rejected"])
        write_atomic(FileSystems.join(self.output, UNITS_DIR, f"{name}.json"), json.dumps(marker).encode())
        self.units.inc()
        self.shards.inc(len(shard_names))
        yield marker


def remove_stale_files(output: str, name: str, shard_names: list[str], reject_name: str | None) -> None:
    """Delete the files an earlier attempt at unit `name` wrote that this attempt did not overwrite (it was killed
    before its marker, or a runner retried the bundle): a redo that splits into fewer shards, or has no rejects,
    would otherwise leave the old ones in shards/ and rejects/, with rows that duplicate the new shards'."""
    own = re.compile(re.escape(name) + r"-\d{5}" + re.escape(SUFFIX))
    stale = [m.path for m in match_in(output, SHARDS_DIR, f"{name}-*{SUFFIX}")
             if own.fullmatch(posixpath.basename(m.path)) and posixpath.basename(m.path) not in shard_names]
    if reject_name is None:
        rejects = FileSystems.join(output, REJECTS_DIR, f"{name}{SUFFIX}")
        stale += [rejects] if FileSystems.exists(rejects) else []
    if stale:
        logger.info("unit %s: removing %d file(s) of an earlier attempt: %s", name, len(stale), stale)
        delete_files(stale)


def reason_code(reject: Reject) -> str:
    """'stage/reason' without the free-text detail: the manifest's grouping key."""
    return f"{reject.stage}/{reject.reason.split(':', 1)[0]}"


def unit_marker(
    source: str, read: int, accepted: int, rejects: list[Reject], shards: list[str], rejects_file: str | None
) -> dict:
    """What a completed unit records: its counts and its files."""
    return {
        "source": source,
        "read": read,
        "accepted": accepted,
        "rejected": len(rejects),
        "rejected_by_reason": dict(sorted(Counter(reason_code(r) for r in rejects).items())),
        "shards": shards,
        "rejects": rejects_file,
    }


class WriteUnits(beam.PTransform):
    """Join rows, rejects and read counts by unit and write each unit; returns the markers written.

    `winners`: optional (key, unit) pairs of keys several units hold (``dedupe.DuplicateKeys``): only the named
    unit keeps its row of such a key.
    """

    def __init__(self, output: str, schema: pa.Schema, target_bytes: int, rows_per_group: int, winners=None) -> None:
        super().__init__()
        self.write = _WriteUnit(output, schema, target_bytes, rows_per_group)
        self.winners = winners

    def expand(self, keyed: dict):
        grouped = keyed | "GroupByUnit" >> beam.CoGroupByKey()
        if self.winners is None:
            return grouped | "WriteUnit" >> beam.ParDo(self.write)
        return grouped | "WriteUnit" >> beam.ParDo(self.write, winners=beam.pvalue.AsDict(self.winners))


def summarize(markers: Iterable[dict]) -> dict:
    """Build-wide counts and files from unit markers."""
    markers = list(markers)
    by_reason: Counter = Counter()
    for marker in markers:
        by_reason.update(marker["rejected_by_reason"])
    mismatched = [m["source"] for m in markers if m["read"] != m["accepted"] + m["rejected"]]
    return {
        "counts": {
            "units": len(markers),
            "read": sum(m["read"] for m in markers),
            "accepted": sum(m["accepted"] for m in markers),
            "rejected": sum(m["rejected"] for m in markers),
            "rejected_by_reason": dict(sorted(by_reason.items())),
            "unit_count_mismatches": mismatched,
        },
        "shards": sorted(s for m in markers for s in m["shards"]),
    }


def write_manifest(
    _: object, output: str, config: dict, lineage: dict, started_at: float, this_run: list, earlier_jobs: int = 0
) -> str:
    """Write manifest.json from every completed unit (this run's and, on --resume, earlier ones); `earlier_jobs`:
    units that earlier jobs of this launch completed (--units-per-run), counted in ``units_this_run`` too."""
    manifest = summarize(read_markers(output))
    manifest.update({
        "config": config,
        "lineage": lineage,
        "units_this_run": len(this_run) + earlier_jobs,
        "started_at": started_at,
        "finished_at": time.time(),
        "wall_time_s": round(time.time() - started_at, 3),
    })
    path = FileSystems.join(output, MANIFEST)
    write_atomic(path, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return path


def read_manifest(output: str) -> dict:
    """Load a build's manifest.json."""
    return read_json(FileSystems.join(output, MANIFEST))
