"""`spatext verify DIR`: check every shard against schema v1 and the build's invariants; non-zero exit on violation.

Invariants: masks decode at the image's size, the segment map holds exactly the indices 1..K of `segments`, areas and
bboxes match the masks, embeddings are finite and unit-norm with the declared dimension, each image is in the declared
`image_format`, every page matches its CRC-32, keys are unique, and manifest.json agrees with the directory: row counts
(accepted + rejected = read), rejects by reason, unit markers in `_units/` (which `--resume` trusts), shard names.

Every problem is reported as a violation naming its file, a damaged or malformed file included; nothing aborts the
report but a directory that holds no build.
"""

from __future__ import annotations

import argparse
import io
import logging
import multiprocessing
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from spatext.paths import match_in
from spatext.pipeline.config import RESUME_MAY_CHANGE
from spatext.pipeline.crop import mask_bbox
from spatext.pipeline.image_formats import OPEN_IMAGE_FORMATS, refused_format_reason
from spatext.pipeline.keys import key_hash
from spatext.pipeline.parquet_files import parquet_file
from spatext.pipeline.records import Reject
from spatext.pipeline.schema import (
    IMAGE_FORMATS,
    REJECT_SCHEMA,
    SCHEMA_VERSION,
    ShardSample,
    read_metadata,
    row_to_sample,
    shard_schema,
    stored_image_format,
)
from spatext.pipeline.write import (
    BUILD_CONFIG,
    MANIFEST,
    REJECTS_DIR,
    SHARDS_DIR,
    SUFFIX,
    UNITS_DIR,
    existing_build,
    list_files,
    list_parquet,
    read_json,
    read_manifest,
    reason_code,
)

logger = logging.getLogger(__name__)
NORM_TOLERANCE = 2e-2  # float16 storage of a unit vector: the norm error stays well below this
AREA_TOLERANCE = 1e-5
# File metadata every samples shard carries (DESIGN.md "The shard contract"; build.shard_metadata writes it).
REQUIRED_METADATA = ("schema_version", "table", "clip_model", "clip_pretrained", "embed_dim", "segmenter",
                     "segmenter_weights", "min_area", "k_min", "k_max", "seed", "image_size", "package_version",
                     "created")
# What decides a build's rows: the same in every shard of one build (a resume refuses to change it).
BUILD_METADATA = ("clip_model", "clip_pretrained", "embed_dim", "segmenter", "segmenter_weights", "min_area", "k_min",
                  "k_max", "seed", "image_size", "image_format")


@dataclass(frozen=True)
class Declared:
    """A shard's declared settings that its rows must keep (None: not declared, or reported as unreadable)."""

    embed_dim: int | None = None
    image_format: str | None = None
    k_max: int | None = None
    min_area: float | None = None
    image_size: int | None = None


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
                lines.append(f"  {_short(where) if where else '-'} [{key or '-'}] {message}")
            if len(self.violations) > limit:
                lines.append(f"  ... and {len(self.violations) - limit} more")
        return "\n".join(lines)


def _short(path: str) -> str:
    """'folder/name' of a path: enough to tell shards/X.parquet from rejects/X.parquet (same stem) in a report."""
    head, name = FileSystems.split(path)
    parent = FileSystems.split(head)[1] if head else ""
    return f"{parent}/{name}" if parent else name


def check_sample(sample: ShardSample, width: int, height: int, embed_dim: int | None,
                 declared: Declared | None = None) -> list[str]:
    """Invariant violations of one decoded row (empty list when it is sound); `declared`: the shard's settings the
    row must keep (K <= k_max, areas >= min_area, longest side <= image_size)."""
    problems = []
    if not sample.caption.strip():
        problems.append("empty_caption")
    declared = declared or Declared()
    if declared.image_size is not None and max(width, height) > declared.image_size:
        problems.append(f"image_size: {width}x{height}, shards declare image_size {declared.image_size}")
    if declared.k_max is not None and len(sample.segments) > declared.k_max:
        problems.append(f"segment_count: {len(sample.segments)} segments, shards declare k_max {declared.k_max}")
    if declared.min_area is not None:
        small = [seg["index"] for seg in sample.segments if seg["area"] < declared.min_area - AREA_TOLERANCE]
        if small:
            problems.append(f"segment_area: segments {small} are below the declared min_area {declared.min_area}")
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


def checked_parquet(path: str) -> pq.ParquetFile:
    """`parquet_file(path)` (Arrow-owned reads; see spatext.pipeline.parquet_files) that verifies every page's CRC-32
    as it reads: the writer stores one per page, and without the check a flipped bit inside a stored image (which
    zstd keeps raw) decodes to a different, valid-looking image. Files written without CRCs read as before."""
    return parquet_file(path, page_checksum_verification=True)


def _damage_kind(exc: Exception, otherwise: str) -> str:
    """'checksum' when a read failed a page CRC (pyarrow raises a plain OSError saying so), else `otherwise`."""
    return "checksum" if "checksum" in str(exc).lower() else otherwise


class _KeyIndex:
    """Which shard files hold each key: the first file of every key, the full list only for duplicated keys (a
    build of millions of rows keeps one small int per key, not a list)."""

    def __init__(self) -> None:
        self.files: list[str] = []
        self.first: dict[str, int] = {}
        self.duplicates: dict[str, list[int]] = {}

    def add(self, key: str, path: str) -> None:
        if not self.files or self.files[-1] != path:
            self.files.append(path)
        where = len(self.files) - 1
        if key in self.first:
            self.duplicates.setdefault(key, [self.first[key]]).append(where)
        else:
            self.first[key] = where

    def report(self, report: VerifyReport) -> None:
        for key, where in self.duplicates.items():
            names = Counter(FileSystems.split(self.files[i])[1] for i in where)
            held = ", ".join(name if n == 1 else f"{name} x{n}" for name, n in names.items())
            report.add(self.files[where[0]], key, f"duplicate_key: appears {len(where)} times, in {held}")


def _declared_format(path: str, meta: dict[str, str], report: VerifyReport) -> str | None:
    """The shard's declared `image_format` (None when absent, or reported when it is not one of IMAGE_FORMATS)."""
    declared = meta.get("image_format")
    if declared is not None and declared not in IMAGE_FORMATS:
        report.add(path, "", f"image_format: shard declares {declared!r}, expected one of {', '.join(IMAGE_FORMATS)}")
        return None
    return declared


def _unidentified_reason(row: dict) -> str:
    """Which of a row's image and segment map Pillow could not identify, and why (reproducibly)."""
    for column in ("image", "segment_map"):
        data = row.get(column) or b""
        try:
            with Image.open(io.BytesIO(data), formats=OPEN_IMAGE_FORMATS):
                continue
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return f"{column}: " + ": ".join(refused_format_reason(data))
    return "an image Pillow could not identify"


def _verify_row(path: str, row: dict, declared: Declared, report: VerifyReport) -> None:
    """Check one stored row: it decodes, satisfies `check_sample`, and its image is in the declared format."""
    embed_dim, image_format = declared.embed_dim, declared.image_format
    try:
        sample = row_to_sample(row)
    except (OSError, ValueError, SyntaxError, TypeError, KeyError, AttributeError) as exc:  # a null segment, too
        # Pillow names the BytesIO object (a memory address) when it cannot identify an image: not reproducible
        reason = _unidentified_reason(row) if isinstance(exc, UnidentifiedImageError) else str(exc)
        report.add(path, row["key"], f"undecodable: {reason}")
        return
    stored = stored_image_format(row["image"])
    if image_format is not None and stored != image_format:
        report.add(path, row["key"], f"image_format: stored image is {stored or 'neither JPEG nor PNG'}, "
                   f"shards declare {image_format}")
    try:
        problems = check_sample(sample, row["width"], row["height"], embed_dim, declared)
    except (TypeError, KeyError, ValueError) as exc:  # e.g. a segment whose fields are null
        problems = [f"undecodable: {type(exc).__name__}: {exc}"]
    for problem in problems:
        report.add(path, row["key"], problem)


def _number(path: str, meta: dict[str, str], name: str, kind: type, report: VerifyReport) -> int | float | None:
    """A numeric metadata value, or None (reported when present but not a number of that kind)."""
    text = meta.get(name)
    if text is None:
        return None
    try:
        if text != text.strip():  # int(' 512') parses, but readers compare the strings
            raise ValueError(text)
        return kind(text)
    except ValueError:
        report.add(path, "", f"metadata: {name} is {text!r}, expected {'an integer' if kind is int else 'a number'}")
        return None


def _declared(path: str, meta: dict[str, str], report: VerifyReport) -> Declared:
    """Check the shard's file metadata (every DESIGN key present, the samples table, numbers where numbers belong);
    return the settings its rows are checked against."""
    missing = [name for name in REQUIRED_METADATA if name not in meta]
    if missing:
        report.add(path, "", f"metadata: missing {', '.join(missing)} (DESIGN.md: what made these rows)")
    if meta.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        report.add(path, "", f"schema_version: {meta.get('schema_version')!r}, expected {SCHEMA_VERSION!r}")
    if meta.get("table", "samples") != "samples":
        report.add(path, "", f"metadata: table is {meta['table']!r}, expected 'samples' under {SHARDS_DIR}/")
    embed_dim = _number(path, meta, "embed_dim", int, report)
    if embed_dim is not None and embed_dim < 1:
        report.add(path, "", f"metadata: embed_dim is {embed_dim}, expected >= 1")
        embed_dim = None
    return Declared(embed_dim=embed_dim, image_format=_declared_format(path, meta, report),
                    k_max=_number(path, meta, "k_max", int, report),
                    min_area=_number(path, meta, "min_area", float, report),
                    image_size=_number(path, meta, "image_size", int, report))


def _verify_shard(path: str, report: VerifyReport, hashes: list[int]) -> dict[str, str]:
    """Check one sample shard: schema, metadata, page checksums, every row; returns its metadata and appends each
    row's key hash to `hashes`."""
    parquet = checked_parquet(path)
    schema = parquet.schema_arrow
    if not schema.remove_metadata().equals(shard_schema().remove_metadata()):
        report.add(path, "", f"schema: columns differ from schema v{SCHEMA_VERSION}: {schema.remove_metadata()}")
        return {}
    meta = read_metadata(schema)
    declared = _declared(path, meta, report)
    for group in range(parquet.num_row_groups):
        try:
            rows = parquet.read_row_group(group).to_pylist()
        except (OSError, ValueError) as exc:  # a damaged page: the group's rows still count (the footer says how many)
            report.rows += parquet.metadata.row_group(group).num_rows
            report.add(path, "", f"{_damage_kind(exc, 'unreadable_shard')}: row group {group}: {exc}")
            continue
        for row in rows:
            report.rows += 1
            hashes.append(key_hash(row["key"]))
            _verify_row(path, row, declared, report)
    return meta


@dataclass
class ShardCheck:
    """What one shard's checks found (what a worker process sends back): its metadata, rows, violations, and the 64-bit
    hash of each row's key, for the duplicate check across shards (8 bytes a key, not the key strings)."""

    path: str
    meta: dict[str, str]
    rows: int
    violations: list[tuple[str, str, str]]
    key_hashes: np.ndarray


def check_shard(path: str) -> ShardCheck:
    """Every check of one shard file: in this process, or in a worker process with ``--processes``."""
    report, hashes = VerifyReport(), []
    try:
        meta = _verify_shard(path, report, hashes)
    except (OSError, ValueError) as exc:  # an unreadable file is a finding, not a crash
        meta = {}
        report.add(path, "", f"unreadable_shard: {exc}")
    return ShardCheck(path, meta, report.rows, report.violations, np.array(hashes, dtype=np.uint64))


def _shard_checks(shards: list[str], processes: int) -> Iterator[ShardCheck]:
    """``check_shard`` of every shard, in order: here, or ``processes`` shards at a time in worker processes (spawned:
    a fork would copy Arrow's and torch's thread pools mid-use)."""
    if processes <= 1 or len(shards) <= 1:
        yield from map(check_shard, shards)
        return
    with ProcessPoolExecutor(min(processes, len(shards)), mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(check_shard, shards, chunksize=1)


def _report_duplicates(checks: list[ShardCheck], report: VerifyReport) -> None:
    """Keys held by more than one row: candidates are repeated key hashes (a sort of 8-byte hashes over the whole
    build); the keys of the shards holding a candidate are then read again and compared as strings, so a hash
    collision is never reported as a duplicate."""
    if not checks:
        return
    hashes = np.concatenate([c.key_hashes for c in checks])
    ordered = np.sort(hashes)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if not len(repeated):
        return
    wanted = set(repeated.tolist())
    keys = _KeyIndex()
    for check in checks:
        if np.isin(check.key_hashes, repeated).any():
            parquet = checked_parquet(check.path)
            for group in range(parquet.num_row_groups):
                try:
                    column = parquet.read_row_group(group, columns=["key"]).column("key").to_pylist()
                except (OSError, ValueError):  # a damaged group: the first pass reported it
                    continue
                for key in column:
                    if key_hash(key) in wanted:
                        keys.add(key, check.path)
    keys.report(report)


def _verify_one_build(output: str, metas: dict[str, dict[str, str]], report: VerifyReport) -> None:
    """The settings that decide a build's rows are the same in every shard: shards of two CLIP spaces (or embedding
    sizes, segmenters, thresholds) are two datasets, which the training loader refuses to mix."""
    for name in BUILD_METADATA:
        values: dict[str | None, list[str]] = {}
        for path, meta in metas.items():
            values.setdefault(meta.get(name), []).append(path)
        if len(values) > 1:
            report.add(FileSystems.join(output, SHARDS_DIR), "", f"metadata_differs: {name} is " + "; ".join(
                f"{value!r} in {len(paths)} shard(s), e.g. {_short(paths[0])}" for value, paths in values.items()))


def _verify_rejects(paths: list[str], report: VerifyReport) -> Counter:
    """Check the rejects tables; returns their rows counted by 'stage/reason' code (the manifest's grouping)."""
    by_reason: Counter = Counter()
    for path in paths:
        try:
            parquet = checked_parquet(path)
            if not parquet.schema_arrow.remove_metadata().equals(REJECT_SCHEMA.remove_metadata()):
                report.add(path, "", "schema: rejects table columns differ from key, source, stage, reason")
                report.rejects += parquet.metadata.num_rows
                continue
        except (OSError, ValueError) as exc:  # not Parquet at all, truncated, ...: a finding, not a crash
            report.add(path, "", f"unreadable_rejects: {exc}")
            continue
        try:
            rows = parquet.read().to_pylist()
        except (OSError, ValueError) as exc:
            report.rejects += parquet.metadata.num_rows
            report.add(path, "", f"{_damage_kind(exc, 'unreadable_rejects')}: {exc}")
            continue
        report.rejects += len(rows)
        by_reason.update(reason_code(Reject(**row)) for row in rows)
    return by_reason


def _load_manifest(output: str, report: VerifyReport) -> dict | None:
    """manifest.json as a dict; None (reported) when it cannot be read or is not a JSON object."""
    path = FileSystems.join(output, MANIFEST)
    try:
        manifest = read_manifest(output)
    except (OSError, ValueError) as exc:
        report.add(path, "", f"manifest: cannot read {MANIFEST}: {exc}")
        return None
    if not isinstance(manifest, dict):
        report.add(path, "", f"manifest: {MANIFEST} holds a JSON {type(manifest).__name__}, expected an object")
        return None
    return manifest


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _manifest_counts(manifest: dict, where: str, report: VerifyReport) -> dict | None:
    """The manifest's `counts`, with every malformed entry reported (count_type) and dropped."""
    counts = manifest.get("counts")
    if not isinstance(counts, dict):
        report.add(where, "", f"manifest: 'counts' is {counts!r}, expected an object")
        return None
    valid = {}
    for name in ("units", "read", "accepted", "rejected"):
        if _is_count(counts.get(name)):
            valid[name] = counts[name]
        else:
            value = counts.get(name)
            report.add(where, "", f"count_type: counts.{name} is {value!r} ({type(value).__name__}), "
                       "expected a non-negative integer")
    by_reason = counts.get("rejected_by_reason")
    if isinstance(by_reason, dict) and all(_is_count(v) for v in by_reason.values()):
        valid["rejected_by_reason"] = by_reason
    else:
        report.add(where, "", f"count_type: counts.rejected_by_reason is {by_reason!r}, expected an object of "
                   "non-negative integers")
    mismatches = counts.get("unit_count_mismatches", [])
    valid["unit_count_mismatches"] = mismatches if isinstance(mismatches, list) else []
    if not isinstance(mismatches, list):
        report.add(where, "", f"count_type: counts.unit_count_mismatches is {mismatches!r}, expected a list")
    return valid


def _names(names: set[str], limit: int = 5) -> str:
    listed = sorted(names)
    return ", ".join(listed[:limit]) + (f" and {len(listed) - limit} more" if len(listed) > limit else "")


def _verify_markers(output: str, shard_names: set[str], reject_names: set[str], report: VerifyReport) -> int:
    """Check the `_units/` markers that `--resume` trusts: each is readable and its files exist; returns how many."""
    paths = list_files(output, UNITS_DIR, ".json")
    for path in paths:
        try:
            marker = read_json(path)
            missing = {f"{SHARDS_DIR}/{n}" for n in set(marker["shards"]) - shard_names}
            if marker["rejects"] and marker["rejects"] not in reject_names:
                missing.add(f"{REJECTS_DIR}/{marker['rejects']}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            report.add(path, "", f"unit_marker: unreadable or malformed ({type(exc).__name__}: {exc})")
            continue
        if missing:
            report.add(path, "", f"unit_marker: lists missing file(s): {_names(missing)}")
    return len(paths)


def _compare(where: str, kind: str, what: str, manifest_says: int | None, found: int, report: VerifyReport) -> None:
    if manifest_says is not None and manifest_says != found:
        report.add(where, "", f"{kind}: manifest says {manifest_says}, {what} {found}")


def _verify_counts(output: str, manifest: dict, found: dict, report: VerifyReport) -> None:
    """Cross-check manifest.json against what the directory holds: `found` has 'shards' and 'rejects' (file names),
    'by_reason' (the rejects tables' Counter by reason code) and 'markers' (how many `_units/` markers)."""
    where = FileSystems.join(output, MANIFEST)
    counts = _manifest_counts(manifest, where, report) or {}
    _compare(where, "count_accepted", "shards hold", counts.get("accepted"), report.rows, report)
    _compare(where, "count_rejected", "rejects hold", counts.get("rejected"), report.rejects, report)
    if "read" in counts and counts["read"] != report.rows + report.rejects:
        report.add(where, "", f"count_read: manifest read {counts['read']} != accepted + rejected "
                   f"{report.rows + report.rejects}")
    by_reason = counts.get("rejected_by_reason")
    if by_reason is not None and Counter(by_reason) != found["by_reason"]:
        differ = sorted(r for r in {*by_reason, *found["by_reason"]} if by_reason.get(r, 0) != found["by_reason"][r])
        report.add(where, "", "count_by_reason: " + "; ".join(
            f"{r}: manifest {by_reason.get(r, 0)}, rejects hold {found['by_reason'][r]}" for r in differ))
    if counts.get("units") and not found["markers"]:
        report.add(where, "", f"units_missing: manifest counts {counts['units']} unit(s) but {UNITS_DIR}/ holds no "
                   "marker; --resume relies on them to skip completed units")
    else:
        _compare(where, "count_units", f"{UNITS_DIR}/ holds markers for", counts.get("units"), found["markers"], report)
    for source in counts.get("unit_count_mismatches", []):
        report.add(where, str(source), "count_unit: a unit's read count differs from its accepted + rejected")
    listed = manifest.get("shards")
    if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
        report.add(where, "", f"manifest: 'shards' is {listed!r}, expected a list of file names")
    elif set(listed) != found["shards"] or len(listed) != len(set(listed)):
        missing, extra = set(listed) - found["shards"], found["shards"] - set(listed)
        report.add(where, "", f"shard_files: manifest lists {len(listed)} shard(s), {SHARDS_DIR}/ has "
                   f"{len(found['shards'])}" + (f"; missing from {SHARDS_DIR}/: {_names(missing)}" if missing else "")
                   + (f"; not in the manifest: {_names(extra)}" if extra else ""))


def _verify_shard_sizes(output: str, manifest: dict, report: VerifyReport) -> None:
    """Shards stay within the build's `--target-shard-mb` (its help calls it the maximum); a shard of one row may
    exceed it, since a row is never split."""
    config = manifest.get("config")
    if not isinstance(config, dict):
        report.add(FileSystems.join(output, MANIFEST), "", f"manifest: 'config' is {config!r}, expected the build's "
                   "settings (an object); the shard sizes cannot be checked against --target-shard-mb")
        return
    target_mb = config.get("target_shard_mb")
    if not isinstance(target_mb, (int, float)) or isinstance(target_mb, bool) or target_mb <= 0:
        return
    limit = int(target_mb * 2**20)
    for meta in sorted(match_in(output, SHARDS_DIR, f"*{SUFFIX}"), key=lambda m: m.path):
        if meta.size_in_bytes > limit:
            try:
                rows = checked_parquet(meta.path).metadata.num_rows
            except (OSError, ValueError):  # unreadable: reported by the shard check
                continue
            if rows > 1:
                report.add(meta.path, "", f"shard_size: {meta.size_in_bytes} bytes in {rows} rows exceed "
                           f"--target-shard-mb {target_mb} ({limit} bytes)")


def verify_build(output: str, progress: bool = True, processes: int = 1) -> VerifyReport:
    """Verify a build directory, ``processes`` shards at a time; returns the report (never raises for a damaged file:
    it is reported; the same report for any number of processes).

    FileNotFoundError when `output` holds no build at all. A build whose manifest accepted no sample (every input
    rejected) has no shards; that is consistent, and the report says so instead of failing."""
    if not existing_build(output):
        raise FileNotFoundError(f"{output!r} holds no build (no manifest.json, shards/ or {UNITS_DIR}/); "
                                "pass the --output of a `spatext build`")
    report = VerifyReport()
    manifest = _load_manifest(output, report)
    counts = manifest.get("counts") if manifest is not None else None
    all_rejected = isinstance(counts, dict) and counts.get("accepted") == 0
    shards, rejects = list_parquet(output, SHARDS_DIR), list_parquet(output, REJECTS_DIR)
    report.shards = len(shards)
    if not shards and not all_rejected:
        report.add(output, "", f"no_shards: no Parquet files under {FileSystems.join(output, SHARDS_DIR)}")
    checks = []
    for check in tqdm(_shard_checks(shards, processes), total=len(shards), desc="verify", unit="shard",
                      disable=not progress):
        report.rows += check.rows
        report.violations += check.violations
        checks.append(check)
    _verify_one_build(output, {c.path: c.meta for c in checks if c.meta}, report)
    _report_duplicates(checks, report)
    found = {"shards": {FileSystems.split(p)[1] for p in shards}, "by_reason": _verify_rejects(rejects, report)}
    found["markers"] = _verify_markers(output, found["shards"], {FileSystems.split(p)[1] for p in rejects}, report)
    _verify_stray_files(output, report)
    if manifest is not None:
        _verify_counts(output, manifest, found, report)
        _verify_shard_sizes(output, manifest, report)
        _verify_build_config(output, manifest, report)
    return report


def _verify_stray_files(output: str, report: VerifyReport) -> None:
    """Files under shards/ or rejects/ (subfolders too) that are not its Parquet tables (a writer's temporary left by
    a kill, a copy): verify reads only ``*.parquet``, but pyarrow.dataset, DuckDB and Hugging Face datasets read
    every file in the folder, so a leftover ``.parquet.tmp`` would be read as data (duplicate or half-written rows).
    Names starting with "." or "_" (``.DS_Store``, ``_SUCCESS``) are skipped, as pyarrow.dataset skips them."""
    for table in (SHARDS_DIR, REJECTS_DIR):
        prefix = FileSystems.join(output, table).rstrip("/") + "/"
        for meta in sorted(match_in(output, table, "**"), key=lambda m: m.path):
            relative = meta.path[len(prefix):] if meta.path.startswith(prefix) else FileSystems.split(meta.path)[1]
            if any(part.startswith((".", "_")) for part in relative.split("/")):
                continue
            if "/" in relative or not relative.endswith(SUFFIX):
                report.add(meta.path, "", f"stray_file: in {table}/ but not one of its Parquet tables; readers of "
                           "the folder (pyarrow.dataset, DuckDB, datasets) read it too: delete it (a --resume "
                           "deletes the temporary files a killed build left)")


def _verify_build_config(output: str, manifest: dict, report: VerifyReport) -> None:
    """build_config.json is there (a --resume needs it) and says what the manifest's config says: two launches into
    one folder left the settings of one and the shards of the other."""
    path = FileSystems.join(output, BUILD_CONFIG)
    try:
        recorded = read_json(path)
    except (OSError, ValueError) as exc:
        report.add(path, "", f"build_config: cannot read {BUILD_CONFIG} (a --resume of this build would refuse): {exc}")
        return
    config = manifest.get("config")
    if not isinstance(recorded, dict) or not isinstance(config, dict):
        return  # a malformed manifest config is reported by the shard-size check
    differ = sorted(k for k in recorded if k in config and recorded[k] != config[k]
                    and k not in ("output", *RESUME_MAY_CHANGE))  # what a resume or a moved build may change
    if differ:
        report.add(path, "", "build_config: differs from the manifest's config in " + "; ".join(
            f"{k} ({recorded[k]!r} vs {config[k]!r})" for k in differ[:5]))


def main(argv: list[str] | None = None) -> int:
    """Console entry: print the report; exit status 1 on any violation (2, via the CLI, when there is no build)."""
    parser = argparse.ArgumentParser(prog="spatext verify", description=__doc__.splitlines()[0])
    parser.add_argument("output", help="a build's output directory (holds shards/, rejects/, manifest.json)")
    parser.add_argument("--limit", type=int, default=50, help="violations to list in full")
    parser.add_argument("--processes", type=int, default=1,
                        help="shards verified at a time, each in a worker process (e.g. the machine's core count)")
    args = parser.parse_args(argv)
    if args.limit < 0:
        parser.error(f"--limit must be >= 0 (0: counts by kind only), got {args.limit}")
    if args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}")
    report = verify_build(args.output, progress=sys.stderr.isatty(), processes=args.processes)  # no bar in pipes
    print(report.format(args.limit))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
