"""Write stage: Parquet shards, the rejects table and manifest.json — and the one home of the output layout."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from spatext.pipeline.records import Reject
from spatext.pipeline.schema import REJECT_SCHEMA, reject_to_row

logger = logging.getLogger(__name__)

SHARDS_DIR = "shards"
REJECTS_DIR = "rejects"
MANIFEST = "manifest.json"
SHARD_PREFIX = "part"
SHARD_SUFFIX = ".parquet"


def shard_pattern(output: str, table: str = SHARDS_DIR) -> str:
    """Glob of a build's Parquet files (table: 'shards' or 'rejects')."""
    return FileSystems.join(output, table, f"{SHARD_PREFIX}-*{SHARD_SUFFIX}")


def list_parquet(output: str, table: str = SHARDS_DIR) -> list[str]:
    """The build's Parquet files of one table, sorted."""
    results = FileSystems.match([shard_pattern(output, table)])
    return sorted(m.path for r in results for m in r.metadata_list)


def clear_output(output: str) -> None:
    """Delete a previous build's shards, rejects and manifest in `output` (for --overwrite)."""
    stale = list_parquet(output, SHARDS_DIR) + list_parquet(output, REJECTS_DIR)
    manifest = FileSystems.join(output, MANIFEST)
    if FileSystems.exists(manifest):
        stale.append(manifest)
    if stale:
        FileSystems.delete(stale)


def existing_build(output: str) -> bool:
    """Whether `output` already holds a build."""
    return bool(list_parquet(output)) or FileSystems.exists(FileSystems.join(output, MANIFEST))


class WriteTable(beam.PTransform):
    """Rows (dicts) -> zstd Parquet files under output/table/; returns the written file names."""

    def __init__(self, output: str, table: str, schema: pa.Schema, rows_per_group: int, num_shards: int = 0) -> None:
        super().__init__()
        self.prefix = FileSystems.join(output, table, SHARD_PREFIX)
        self.schema, self.rows_per_group, self.num_shards = schema, rows_per_group, num_shards

    def expand(self, rows):
        return rows | beam.io.WriteToParquet(
            self.prefix,
            schema=self.schema,
            codec="zstd",
            # Beam's documented way to get row groups of N rows: a 1-byte buffer and N-row record batches.
            row_group_buffer_size=1,
            record_batch_size=self.rows_per_group,
            file_name_suffix=SHARD_SUFFIX,
            num_shards=self.num_shards,
        )


class WriteRejects(beam.PTransform):
    """Rejects -> output/rejects/*.parquet (key, source, stage, reason)."""

    def __init__(self, output: str) -> None:
        super().__init__()
        self.output = output

    def expand(self, rejects):
        return (
            rejects
            | "RejectRows" >> beam.Map(reject_to_row)
            | "WriteRejectParquet" >> WriteTable(self.output, REJECTS_DIR, REJECT_SCHEMA, rows_per_group=4096)
        )


def reason_code(reject: Reject) -> str:
    """'stage/reason' without the free-text detail: the manifest's grouping key."""
    return f"{reject.stage}/{reject.reason.split(':', 1)[0]}"


def write_manifest(
    _: object,
    output: str,
    config: dict,
    lineage: dict,
    read: int,
    accepted: int,
    rejected: Iterable[tuple[str, int]],
    files: Iterable[str],
    started_at: float,
) -> str:
    """Write manifest.json (runs once, after the shards are final); returns its path."""
    by_reason = dict(sorted(rejected))
    manifest = {
        "counts": {
            "read": read,
            "accepted": accepted,
            "rejected": sum(by_reason.values()),
            "rejected_by_reason": by_reason,
        },
        "shards": sorted(FileSystems.split(f)[1] for f in files),
        "config": config,
        "lineage": lineage,
        "started_at": started_at,
        "finished_at": time.time(),
        "wall_time_s": round(time.time() - started_at, 3),
    }
    path = FileSystems.join(output, MANIFEST)
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
    return path


def read_manifest(output: str) -> dict:
    """Load a build's manifest.json."""
    with FileSystems.open(FileSystems.join(output, MANIFEST)) as handle:
        return json.loads(handle.read())
