"""`spatext verify DIR`: check every shard against schema v1 and the build's invariants; non-zero exit on violation.

Invariants: masks decode at the image's size, the segment map holds exactly the indices 1..K of `segments`, areas and
bboxes match the masks, embeddings are finite and unit-norm with the declared dimension, keys are unique, and the
row counts match the manifest (accepted + rejected = read).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from apache_beam.io.filesystems import FileSystems
from tqdm import tqdm

from spatext.pipeline.crop import mask_bbox
from spatext.pipeline.parquet_files import parquet_file
from spatext.pipeline.schema import (
    REJECT_SCHEMA,
    SCHEMA_VERSION,
    ShardSample,
    read_metadata,
    row_to_sample,
    shard_schema,
)
from spatext.pipeline.write import REJECTS_DIR, SHARDS_DIR, UNITS_DIR, existing_build, list_parquet, read_manifest

logger = logging.getLogger(__name__)
NORM_TOLERANCE = 2e-2  # float16 storage of a unit vector: the norm error stays well below this
AREA_TOLERANCE = 1e-5


@dataclass
class VerifyReport:
    """What verify found: counts, and every violation (file, key, message)."""

    shards: int = 0
    rows: int = 0
    rejects: int = 0
    violations: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def add(self, where: str, key: str, message: str) -> None:
        self.violations.append((where, key, message))

    def format(self, limit: int = 50) -> str:
        """A readable report: summary line, violation counts by kind, the first `limit` violations."""
        status = "OK" if self.ok else f"FAILED: {len(self.violations)} violation(s)"
        lines = [f"{status} — {self.shards} shard(s), {self.rows} row(s), {self.rejects} reject row(s)"]
        if self.ok and not self.rows:
            lines[0] += "; no sample was accepted: every input was rejected (reasons in rejects/)"
        if self.violations:
            kinds = Counter(message.split(":", 1)[0] for _, _, message in self.violations)
            lines.append("by kind: " + ", ".join(f"{k} x{n}" for k, n in kinds.most_common()))
            for where, key, message in self.violations[:limit]:
                lines.append(f"  {FileSystems.split(where)[1] if where else '-'} [{key or '-'}] {message}")
            if len(self.violations) > limit:
                lines.append(f"  ... and {len(self.violations) - limit} more")
        return "\n".join(lines)


def check_sample(sample: ShardSample, width: int, height: int, embed_dim: int | None) -> list[str]:
    """Invariant violations of one decoded row (empty list when it is sound)."""
    problems = []
    if not sample.caption.strip():
        problems.append("empty_caption")
    if sample.image.shape[:2] != (height, width):
        actual = f"{sample.image.shape[1]}x{sample.image.shape[0]}"
        problems.append(f"image_size: image is {actual}, row says {width}x{height}")
    if sample.segment_map.shape != (height, width):
        problems.append(f"mask_size: segment map is {sample.segment_map.shape[::-1]}, image {width}x{height}")
        return problems
    indices = sorted(seg["index"] for seg in sample.segments)
    present = sorted(int(v) for v in np.unique(sample.segment_map) if v != 0)
    if not indices or indices != list(range(1, len(indices) + 1)) or present != indices:
        problems.append(f"segment_count: map holds {present}, segments list {indices}")
    for seg in sample.segments:
        mask = sample.segment_map == seg["index"]
        if mask.any():
            if abs(seg["area"] - mask.mean()) > AREA_TOLERANCE:
                problems.append(f"segment_area: segment {seg['index']} says {seg['area']:.6f}, mask {mask.mean():.6f}")
            if list(seg["bbox"]) != list(mask_bbox(mask)):
                problems.append(f"segment_bbox: segment {seg['index']} says {seg['bbox']}, mask {mask_bbox(mask)}")
        problems += _check_embedding(f"segment {seg['index']} embedding", seg["embedding"], embed_dim)
    problems += _check_embedding("image_embedding", sample.image_embedding, embed_dim)
    problems += _check_embedding("caption_embedding", sample.caption_embedding, embed_dim)
    return problems


def _check_embedding(name: str, vector: np.ndarray, embed_dim: int | None) -> list[str]:
    if embed_dim is not None and vector.shape != (embed_dim,):
        return [f"embedding_dim: {name} has {vector.shape[0]} values, shards declare {embed_dim}"]
    if not np.all(np.isfinite(vector)):
        return [f"embedding_finite: {name} has non-finite values"]
    norm = float(np.linalg.norm(vector))
    if abs(norm - 1.0) > NORM_TOLERANCE:
        return [f"embedding_norm: {name} has norm {norm:.4f}"]
    return []


def _verify_shard(path: str, report: VerifyReport, keys: Counter) -> None:
    """Check one sample shard: schema, metadata, every row."""
    parquet = parquet_file(path)
    schema = parquet.schema_arrow
    if not schema.remove_metadata().equals(shard_schema().remove_metadata()):
        report.add(path, "", f"schema: columns differ from schema v{SCHEMA_VERSION}: {schema.remove_metadata()}")
        return
    meta = read_metadata(schema)
    if meta.get("schema_version") != SCHEMA_VERSION:
        report.add(path, "", f"schema_version: {meta.get('schema_version')!r}, expected {SCHEMA_VERSION!r}")
    embed_dim = int(meta["embed_dim"]) if meta.get("embed_dim", "").isdigit() else None
    for group in range(parquet.num_row_groups):
        for row in parquet.read_row_group(group).to_pylist():
            report.rows += 1
            keys[row["key"]] += 1
            try:
                sample = row_to_sample(row)
            except (OSError, ValueError, SyntaxError) as exc:
                report.add(path, row["key"], f"undecodable: {exc}")
                continue
            for problem in check_sample(sample, row["width"], row["height"], embed_dim):
                report.add(path, row["key"], problem)


def _verify_rejects(paths: list[str], report: VerifyReport) -> None:
    for path in paths:
        table = parquet_file(path).read()
        if not table.schema.remove_metadata().equals(REJECT_SCHEMA.remove_metadata()):
            report.add(path, "", "schema: rejects table columns differ from key, source, stage, reason")
        report.rejects += table.num_rows


def _verify_counts(output: str, shards: list[str], report: VerifyReport) -> None:
    try:
        manifest = read_manifest(output)
    except (OSError, ValueError) as exc:
        report.add(output, "", f"manifest: cannot read manifest.json: {exc}")
        return
    counts = manifest.get("counts", {})
    if counts.get("accepted") != report.rows:
        report.add(output, "", f"count_accepted: manifest says {counts.get('accepted')}, shards hold {report.rows}")
    if counts.get("rejected") != report.rejects:
        report.add(output, "", f"count_rejected: manifest says {counts.get('rejected')}, rejects hold {report.rejects}")
    if counts.get("read") != report.rows + report.rejects:
        report.add(output, "", f"count_read: manifest read {counts.get('read')} != accepted + rejected "
                   f"{report.rows + report.rejects}")
    for source in counts.get("unit_count_mismatches", []):
        report.add(output, source, "count_unit: a unit's read count differs from its accepted + rejected")
    listed = sorted(manifest.get("shards", []))
    present = sorted(FileSystems.split(p)[1] for p in shards)
    if listed != present:
        report.add(output, "", f"shard_files: manifest lists {len(listed)} shard(s), directory has {len(present)}")


def _all_rejected(output: str) -> bool:
    """Whether the manifest says the build accepted no sample (then no shards is right, not a violation)."""
    try:
        return read_manifest(output).get("counts", {}).get("accepted") == 0
    except (OSError, ValueError):
        return False


def verify_build(output: str, progress: bool = True) -> VerifyReport:
    """Verify a build directory; returns the report (never raises for a bad shard: it is reported).

    FileNotFoundError when `output` holds no build at all. A build whose manifest accepted no sample (every input
    rejected) has no shards; that is consistent, and the report says so instead of failing."""
    if not existing_build(output):
        raise FileNotFoundError(f"{output!r} holds no build (no manifest.json, shards/ or {UNITS_DIR}/); "
                                "pass the --output of a `spatext build`")
    report = VerifyReport()
    shards = list_parquet(output, SHARDS_DIR)
    report.shards = len(shards)
    if not shards and not _all_rejected(output):
        report.add(output, "", f"no_shards: no Parquet files under {FileSystems.join(output, SHARDS_DIR)}")
    keys: Counter = Counter()
    for path in tqdm(shards, desc="verify", unit="shard", disable=not progress):
        try:
            _verify_shard(path, report, keys)
        except (OSError, ValueError) as exc:  # an unreadable file is a finding, not a crash
            report.add(path, "", f"unreadable_shard: {exc}")
    for key, count in keys.items():
        if count > 1:
            report.add("", key, f"duplicate_key: appears {count} times")
    _verify_rejects(list_parquet(output, REJECTS_DIR), report)
    _verify_counts(output, shards, report)
    return report


def main(argv: list[str] | None = None) -> int:
    """Console entry: print the report; exit status 1 on any violation (2, via the CLI, when there is no build)."""
    parser = argparse.ArgumentParser(prog="spatext verify", description=__doc__.splitlines()[0])
    parser.add_argument("output", help="a build's output directory (holds shards/, rejects/, manifest.json)")
    parser.add_argument("--limit", type=int, default=50, help="violations to list in full")
    args = parser.parse_args(argv)
    report = verify_build(args.output, progress=sys.stderr.isatty())  # no bar in logs and pipes
    print(report.format(args.limit))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
