"""Read stage: corpus files -> RawSample (or Reject), for webdataset tars and image folders + captions.jsonl.

Paths go through Beam's FileSystems, so local paths, gs://, s3:// (and any registered filesystem) work. Tar members
are read in memory and never extracted, so member names cannot escape anywhere (no path traversal); oversized
members are rejected before they are read.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import tarfile
from collections.abc import Iterable, Iterator
from typing import IO

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from spatext.pipeline.records import RawSample, Reject

logger = logging.getLogger(__name__)

INPUT_FORMATS = ("auto", "webdataset", "folder")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
CAPTIONS_FILE = "captions.jsonl"
MAX_MEMBER_BYTES = 64 * 1024 * 1024
FOLDER_UNIT_LINES = 1000  # a folder's captions.jsonl is read in units of this many lines (the resume granularity)
REJECTS = "rejects"
COUNTS = "counts"  # (unit source, number of inputs read from it): the independent side of accepted + rejected = read

_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand webdataset-style numeric ranges: 'shard-{000..002}.tar' -> three names (zero padding kept)."""
    match = _BRACE_RANGE.search(pattern)
    if not match:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    width = len(lo) if lo.startswith("0") else 0
    head, tail = pattern[: match.start()], pattern[match.end() :]
    out = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(expand_braces(f"{head}{i:0{width}d}{tail}"))
    return out


def match_files(pattern: str) -> list[str]:
    """All files matching a pattern (globs and brace ranges), sorted; empty if none."""
    paths: list[str] = []
    for expanded in expand_braces(pattern):
        for result in FileSystems.match([expanded]):
            paths.extend(m.path for m in result.metadata_list)
    return sorted(set(paths))


def detect_format(pattern: str) -> str:
    """'webdataset' for tar patterns, 'folder' for a directory holding captions.jsonl; else ValueError."""
    if pattern.rstrip("/").endswith(CAPTIONS_FILE) or FileSystems.exists(FileSystems.join(pattern, CAPTIONS_FILE)):
        return "folder"
    files = match_files(pattern)
    if not files:
        raise ValueError(f"--input {pattern!r} matches no file")
    if all(f.endswith(".tar") for f in files):
        return "webdataset"
    odd = next(f for f in files if not f.endswith(".tar"))
    raise ValueError(
        f"--input {pattern!r}: cannot detect the format from {odd!r}; pass a pattern of .tar files (webdataset) "
        f"or a folder containing {CAPTIONS_FILE}, or set --input-format"
    )


def split_member_name(name: str) -> tuple[str, str]:
    """Webdataset convention: 'dir/KEY.ext.ext' -> ('dir/KEY', 'ext.ext'); the key ends at the basename's first dot."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), ext.lower()


def _raw_from_members(key: str, source: str, members: dict[str, bytes]) -> RawSample:
    """Assemble one RawSample from a key's tar members (image, caption, optional panoptic ground truth)."""
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    meta = _parse_json(members.get("json"))
    caption = members["txt"].decode("utf-8", errors="replace") if "txt" in members else None
    if caption is None and isinstance(meta, dict) and isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    annotation = meta if isinstance(meta, dict) and "segments_info" in meta else None
    return RawSample(key, source, image, caption, members.get("panoptic.png"), annotation)


def _parse_json(data: bytes | None) -> object:
    """Parse JSON bytes, or None when absent or malformed (a malformed annotation is caught at decode)."""
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {"segments_info": None, "error": "malformed json"}


def iter_webdataset(fileobj: IO[bytes], source: str) -> Iterator[RawSample | Reject]:
    """Stream one webdataset tar: one RawSample per key; a Reject for each unusable key or a broken archive."""
    seen: set[str] = set()
    current: str | None = None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                if key != current:
                    if current is not None:
                        yield _raw_from_members(current, source, members)
                    if key in seen:
                        yield Reject(key, source, "read", "duplicate_key")
                        current, members = None, {}
                        continue
                    seen.add(key)
                    current, members = key, {}
                if info.size > MAX_MEMBER_BYTES:
                    yield Reject(key, source, "read", f"member_too_large: {info.name} has {info.size} bytes")
                    current, members = None, {}
                    continue
                handle = tar.extractfile(info)
                if handle is not None:
                    members[ext] = handle.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield Reject(f"{source}#{current or 'archive'}", source, "read", f"unreadable_tar: {exc}")
        return
    if current is not None:
        yield _raw_from_members(current, source, members)


def folder_unit(source: str, line_number: int, unit_lines: int = FOLDER_UNIT_LINES) -> str:
    """The unit a captions.jsonl line belongs to: 'path#000003' for lines 3001..4000 (1-based)."""
    return f"{source}#{(line_number - 1) // unit_lines:06d}"


def iter_caption_lines(
    lines: Iterable[str], source: str, unit_lines: int = FOLDER_UNIT_LINES
) -> Iterator[dict | Reject]:
    """Parse captions.jsonl lines into entries {key, image, caption, unit}; bad or duplicate lines become Rejects."""
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        unit = folder_unit(source, number, unit_lines)
        try:
            entry = json.loads(line)
            image = entry.get("image") or entry.get("file_name")
            key = str(entry.get("key") or posixpath.splitext(image)[0])
        except (ValueError, AttributeError, TypeError):
            yield Reject(f"{source}:{number}", unit, "read", "malformed_caption_line")
            continue
        if key in seen:
            yield Reject(key, unit, "read", "duplicate_key")
            continue
        seen.add(key)
        yield {"key": key, "image": image, "caption": entry.get("caption"), "unit": unit}


def _read_optional(path: str) -> bytes | None:
    """A file's bytes, or None if it does not exist."""
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as handle:
        return handle.read()


def load_folder_entry(entry: dict, root: str) -> RawSample | Reject:
    """Read one folder entry's image and optional panoptic ground truth (panoptic/KEY.png + .json)."""
    key, source = entry["key"], entry.get("unit") or FileSystems.join(root, CAPTIONS_FILE)
    image_path = FileSystems.join(root, entry["image"]) if entry.get("image") else None
    try:
        image = _read_optional(image_path) if image_path else None
        panoptic_png = _read_optional(FileSystems.join(root, "panoptic", f"{key}.png"))
        panoptic_json = _read_optional(FileSystems.join(root, "panoptic", f"{key}.json"))
    except OSError as exc:
        return Reject(key, source, "read", f"unreadable_file: {exc}")
    annotation = _parse_json(panoptic_json)
    return RawSample(key, source, image, entry.get("caption"), panoptic_png, annotation)


class _ReadTar(beam.DoFn):
    """One webdataset tar -> RawSamples, with Rejects on 'rejects' and (tar, items read) on 'counts'."""

    def __init__(self) -> None:
        self.read = beam.metrics.Metrics.counter("spatext_read", "samples_read")
        self.rejected = beam.metrics.Metrics.counter("spatext_read", "rejected")

    def process(self, path: str) -> Iterator:
        count = 0
        with FileSystems.open(path) as handle:
            for item in iter_webdataset(handle, path):
                count += 1
                yield from _route(item, self.read, self.rejected)
        yield beam.pvalue.TaggedOutput(COUNTS, (path, count))


def _route(item: RawSample | Reject, read_counter, reject_counter) -> Iterator:
    """Send Rejects to the tagged output, everything else to the main one."""
    if isinstance(item, Reject):
        reject_counter.inc()
        yield beam.pvalue.TaggedOutput(REJECTS, item)
    else:
        read_counter.inc()
        yield item


class _ReadCaptions(beam.DoFn):
    """captions.jsonl -> entries (main), Rejects and per-unit counts (tagged); units in `skip` are left out."""

    def __init__(self, skip: frozenset[str]) -> None:
        self.skip = skip

    def process(self, path: str) -> Iterator:
        counts: dict[str, int] = {}
        with FileSystems.open(path) as handle:
            lines = (raw.decode("utf-8", errors="replace") for raw in handle)
            for item in iter_caption_lines(lines, path):
                unit = item.source if isinstance(item, Reject) else item["unit"]
                if unit in self.skip:
                    continue
                counts[unit] = counts.get(unit, 0) + 1
                yield beam.pvalue.TaggedOutput(REJECTS, item) if isinstance(item, Reject) else item
        for unit, count in counts.items():
            yield beam.pvalue.TaggedOutput(COUNTS, (unit, count))


class _LoadFolderEntry(beam.DoFn):
    """Folder entry -> RawSample (main) or Reject (tagged)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.read = beam.metrics.Metrics.counter("spatext_read", "samples_read")
        self.rejected = beam.metrics.Metrics.counter("spatext_read", "rejected")

    def process(self, entry: dict) -> Iterator:
        yield from _route(load_folder_entry(entry, self.root), self.read, self.rejected)


class ReadCorpus(beam.PTransform):
    """Read a corpus; returns {"samples": RawSamples, "rejects": Rejects, "counts": (unit source, items read)}.

    Units (tars, or chunks of captions.jsonl) whose source is in `skip` — completed by an earlier run — are not read.
    """

    def __init__(self, pattern: str, input_format: str = "auto", skip: Iterable[str] = ()) -> None:
        super().__init__()
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"--input-format must be one of {INPUT_FORMATS}, got {input_format!r}")
        self.pattern = pattern
        self.input_format = detect_format(pattern) if input_format == "auto" else input_format
        self.skip = frozenset(skip)

    def expand(self, pbegin):
        if self.input_format == "webdataset":
            files = match_files(self.pattern)
            if not files:
                raise ValueError(f"--input {self.pattern!r} matches no file")
            read = (
                pbegin
                | "ListTars" >> beam.Create([f for f in files if f not in self.skip])
                | "SpreadTars" >> beam.Reshuffle()
                | "ReadTars" >> beam.ParDo(_ReadTar()).with_outputs(REJECTS, COUNTS, main="samples")
            )
            return {"samples": read.samples, REJECTS: read[REJECTS], COUNTS: read[COUNTS]}
        root = self.pattern.rstrip("/")
        if root.endswith(CAPTIONS_FILE):
            root = posixpath.dirname(root)
        entries = (
            pbegin
            | "ListCaptions" >> beam.Create([FileSystems.join(root, CAPTIONS_FILE)])
            | "ReadCaptions" >> beam.ParDo(_ReadCaptions(self.skip)).with_outputs(REJECTS, COUNTS, main="entries")
        )
        loaded = (
            entries.entries
            | "SpreadEntries" >> beam.Reshuffle()
            | "LoadImages" >> beam.ParDo(_LoadFolderEntry(root)).with_outputs(REJECTS, main="samples")
        )
        rejects = (entries[REJECTS], loaded[REJECTS]) | "MergeReadRejects" >> beam.Flatten()
        return {"samples": loaded.samples, REJECTS: rejects, COUNTS: entries[COUNTS]}


def has_annotations(pattern: str, input_format: str, probe_members: int = 64) -> bool:
    """Whether the corpus carries panoptic ground truth (looks at the first tar, or the folder's panoptic/)."""
    fmt = detect_format(pattern) if input_format == "auto" else input_format
    if fmt == "folder":
        root = pattern.rstrip("/")
        root = posixpath.dirname(root) if root.endswith(CAPTIONS_FILE) else root
        results = FileSystems.match([FileSystems.join(root, "panoptic", "*.png")], limits=[1])
        return any(r.metadata_list for r in results)
    files = match_files(pattern)
    if not files:
        return False
    with FileSystems.open(files[0]) as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
        for number, info in enumerate(tar):
            if split_member_name(info.name)[1] == "panoptic.png":
                return True
            if number >= probe_members:
                break
    return False
