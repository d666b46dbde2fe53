"""Read stage: corpus files -> RawSample (or Reject); the one entry point (`ReadCorpus`) and format detection.

Formats: webdataset tars and image folders + captions.jsonl (here), parquet (`read_parquet`: img2dataset, Hugging
Face datasets) and COCO panoptic (`read_coco`). Paths go through Beam's FileSystems, so local paths, gs://, s3://
(and any registered filesystem) work. Tar members are read in memory and never extracted, so member names cannot
escape anywhere (no path traversal); oversized members are rejected before they are read.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import logging
import lzma
import os
import posixpath
import re
import stat
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from spatext.paths import match_in, within
from spatext.pipeline.records import REJECTS, RawSample, Reject, utf8_encodable

logger = logging.getLogger(__name__)

INPUT_FORMATS = ("auto", "webdataset", "folder", "parquet", "coco")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
# The tar members a sample is made of; the rest are skipped without being read, so a key's bytes in memory are at most
# len(USED_EXTENSIONS) x MAX_MEMBER_BYTES, whatever else the tar holds.
USED_EXTENSIONS = frozenset({*IMAGE_EXTENSIONS, "txt", "json", "panoptic.png"})
CAPTIONS_FILE = "captions.jsonl"
MAX_MEMBER_BYTES = 64 * 1024 * 1024
FOLDER_UNIT_LINES = 1000  # a folder's captions.jsonl is read in units of this many lines (the resume granularity)
COCO_UNIT_IMAGES = 1000  # a COCO split is read in units of this many images (the resume granularity)
# A compressed tar is refused once it has expanded past EXPANSION_GRACE_BYTES and more than MAX_TAR_EXPANSION times
# its compressed bytes: a bomb then costs at most about a GiB of decompression. Images seldom compress much; flat
# uncompressed BMP/TIFF can (a near-white 1024 px BMP: ~1000x in gzip), hence the grace of a whole GiB.
MAX_TAR_EXPANSION = 1000
EXPANSION_GRACE_BYTES = 1 << 30
MAGIC_BYTES = 10  # what compression detection reads first (bzip2's header and block magic)
COUNTS = "counts"  # (unit source, number of inputs read from it): the independent side of accepted + rejected = read

FILE_FORMATS = {".tar": "webdataset", ".parquet": "parquet"}  # what a matched file's extension says
VALID_INPUTS = (
    "webdataset: .tar files (a glob or {000..099} range); parquet: .parquet files; "
    f"folder: a directory with {CAPTIONS_FILE}; coco: a COCO root with annotations/panoptic_{{split}}.json"
)

BAD_CAPTION_ENCODING = "bad_caption_encoding"  # a caption that is not UTF-8: rejected, never decoded lossily
BAD_NAME_ENCODING = "bad_name_encoding"  # a key or file name that UTF-8 cannot encode (a non-UTF-8 name)
BAD_LABEL_ENCODING = "bad_label_encoding"  # a ground-truth label (category name) that UTF-8 cannot encode
OUTSIDE_CORPUS = "path_outside_corpus"  # a folder entry naming a file outside the corpus root

_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_GLOB_CHARS = re.compile(r"[*?[]")  # what makes a path a glob for FileSystems.match


@dataclass(frozen=True)
class ReadOptions:
    """How to read the corpus: its format and the format-specific choices (None = detect)."""

    input_format: str = "auto"
    image_column: str | None = None  # parquet
    caption_column: str | None = None  # parquet
    key_column: str | None = None  # parquet
    coco_split: str | None = None  # coco
    coco_unit_images: int = COCO_UNIT_IMAGES  # coco: images per unit of work

    def __post_init__(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"--input-format must be one of {', '.join(INPUT_FORMATS)}; got {self.input_format!r}")

    def check_applies_to(self, input_format: str) -> None:
        """ValueError when a format-specific flag is set for another format (a flag is never silently ignored)."""
        flags = {"--image-column": (self.image_column, "parquet"), "--caption-column": (self.caption_column, "parquet"),
                 "--key-column": (self.key_column, "parquet"), "--coco-split": (self.coco_split, "coco")}
        for flag, (value, fmt) in flags.items():
            if value is not None and input_format != fmt:
                raise ValueError(f"{flag} applies to {fmt} input only; --input is {input_format}")


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
    return _match(pattern)[0]


def _match(pattern: str) -> tuple[list[str], list[str]]:
    """(the files matching a pattern, sorted; the names its brace range spells out without a glob that match none)."""
    paths: list[str] = []
    missing: list[str] = []
    for expanded in expand_braces(pattern):
        # Beam's local match finds nothing for a bare name ("shard-*.tar" in the current directory): ask for
        # "./shard-*.tar" and give the paths back as spelled
        bare = "://" not in expanded and not os.path.dirname(expanded)
        query = os.path.join(os.curdir, expanded) if bare else expanded
        found = [m.path for result in FileSystems.match([query]) for m in result.metadata_list]
        if bare:
            found = [path.removeprefix(os.curdir + os.sep) for path in found]
        if not found and expanded != pattern and not _GLOB_CHARS.search(expanded):
            missing.append(expanded)
        paths.extend(found)
    return sorted(set(paths)), missing


def detect_format(pattern: str) -> str:
    """The format `--input` is in: folder, coco, webdataset or parquet; ValueError naming an odd file otherwise."""
    if pattern.rstrip("/").endswith(CAPTIONS_FILE) or FileSystems.exists(FileSystems.join(pattern, CAPTIONS_FILE)):
        return "folder"
    from spatext.pipeline.read_coco import coco_splits  # lazy: read_coco builds on this module

    if coco_splits(pattern):
        return "coco"
    files = match_files(pattern)
    if not files:
        raise ValueError(f"--input {pattern!r} matches no file; valid inputs: {VALID_INPUTS}")
    kinds = {f: FILE_FORMATS.get(posixpath.splitext(f)[1].lower()) for f in files}
    found = Counter(k for k in kinds.values() if k)
    odd = next((f for f in files if kinds[f] is None), None)
    if odd is None and len(found) == 1:
        return next(iter(found))
    if odd is not None and odd == pattern.rstrip("/"):
        why = f"a directory without {CAPTIONS_FILE} or annotations/panoptic_*.json; for its files pass a glob"
    elif odd is not None:
        why = "not a .tar or .parquet file"
    else:
        majority = found.most_common(1)[0][0]
        odd = next(f for f in files if kinds[f] != majority)
        why = f"mixed input: a {kinds[odd]} file among {found[majority]} {majority} file(s)"
    raise ValueError(
        f"--input {pattern!r}: cannot detect the format from {odd!r} ({why}); valid inputs: {VALID_INPUTS}; "
        "or set --input-format"
    )


def folder_captions(pattern: str) -> str:
    """The captions.jsonl of a folder corpus given as its directory or as the file itself."""
    root = pattern.rstrip("/")
    return root if root.endswith(CAPTIONS_FILE) else FileSystems.join(root, CAPTIONS_FILE)


def check_input(pattern: str, options: ReadOptions) -> str:
    """The format of `--input` (detected for auto) after the launcher's checks: a file pattern matches some file, no
    format-specific flag is set for another format, a Parquet corpus's first file has usable columns; ValueError
    naming the flag or the file otherwise."""
    fmt = detect_format(pattern) if options.input_format == "auto" else options.input_format
    options.check_applies_to(fmt)
    if fmt in ("webdataset", "parquet"):
        files, missing = _match(pattern)
        if not files:
            raise ValueError(f"--input {pattern!r} matches no file")
        if missing:  # a range names its files: a gap is a lost or misnamed shard, not an empty one
            raise ValueError(
                f"--input {pattern!r}: {len(missing)} of the {len(files) + len(missing)} files its brace range names "
                f"do not exist, e.g. {missing[0]}; to read whichever exist, use a glob (e.g. shard-*.tar)")
        if fmt == "webdataset" and _is_parquet(files[0]):  # a damaged tar is a reject; a Parquet file is a mistake
            raise ValueError(f"--input: {files[0]!r} is a Parquet file, which --input-format webdataset cannot read; "
                             "use --input-format parquet (or auto)")
        if fmt == "parquet":  # its columns too, before --output is touched: the run with corrected column flags
            from spatext.pipeline.read_parquet import columns_for  # lazy: read_parquet builds on this module

            columns_for(files[0], options)  # must not find --output already claimed by this failed one
    if fmt == "folder" and not FileSystems.exists(folder_captions(pattern)):
        raise ValueError(f"--input {pattern!r} with --input-format folder: {folder_captions(pattern)} does not exist "
                         f"(a folder corpus is a directory holding {CAPTIONS_FILE}); valid inputs: {VALID_INPUTS}")
    if fmt == "coco":  # its layout (image and PNG folders, both JSON files) before --output is touched
        from spatext.pipeline.read_coco import find_coco  # lazy: read_coco builds on this module

        find_coco(pattern, options.coco_split)
    return fmt


def _is_parquet(path: str) -> bool:
    """Whether a file starts with Parquet's magic bytes."""
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            return handle.read(4) == b"PAR1"
    except OSError:
        return False


def split_member_name(name: str) -> tuple[str, str]:
    """Webdataset convention: 'dir/KEY.ext.ext' -> ('dir/KEY', 'ext.ext'); the key ends at the basename's first dot."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), ext.lower()


def _raw_from_members(key: str, source: str, members: dict[str, bytes]) -> RawSample | Reject:
    """Assemble one RawSample from a key's tar members (image, caption, optional panoptic ground truth); a Reject
    when the caption is not UTF-8 (decoding it with replacement characters would corrupt the text silently)."""
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    meta = _parse_json(members.get("json"))
    try:
        caption = members["txt"].decode("utf-8") if "txt" in members else None
    except UnicodeDecodeError as exc:
        return Reject(key, source, "read", f"{BAD_CAPTION_ENCODING}: {key}.txt is not UTF-8 ({exc.reason} at byte "
                      f"{exc.start})")
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
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: '[' nested beyond Python's stack
        return {"segments_info": None, "error": "malformed json"}


class _EndCheckedTarInfo(tarfile.TarInfo):
    """TarInfo that notes on its TarFile why reading the next header failed. In stream mode, tarfile ends the
    iteration without an error on a truncated, invalid or missing header anywhere but at offset 0, the same as at
    the archive's end marker, which would lose every later sample without a trace; ``check_tar_end`` tells them
    apart."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar.spatext_header_error = (exc, tar.offset)  # tar.offset: where the header that failed starts
            raise

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        if 0 < len(buf) < tarfile.BLOCKSIZE and not buf.strip(b"\0"):  # an end marker cut short: every member
            raise tarfile.EOFHeaderError("end of file header")          # before it is whole (GNU tar reads it)
        return super().frombuf(buf, encoding, errors)


def check_tar_end(tar: tarfile.TarFile) -> None:
    """tarfile.ReadError unless the iteration of `tar` (opened with ``_EndCheckedTarInfo``) ended at the archive's
    end marker (a zero block): a truncated or corrupt header, or a file that stops at a member boundary without
    the marker, may hide later members."""
    exc, offset = getattr(tar, "spatext_header_error", (None, 0))
    if exc is None or isinstance(exc, tarfile.EOFHeaderError):
        return
    if isinstance(exc, tarfile.EmptyHeaderError):
        raise tarfile.ReadError(f"the archive stops at byte {offset} of its tar data (decompressed, for a compressed "
                                "tar) without its end-of-archive marker (a truncated tar: later members, if any, are "
                                "lost)")
    raise tarfile.ReadError(f"truncated or invalid member header at byte {offset} of the tar data (decompressed, for "
                            f"a compressed tar) ({exc}): the members after it cannot be read")


class _CountingReader(io.RawIOBase):
    """A read-only stream over ``fileobj`` that counts the bytes read through it (``count``)."""

    def __init__(self, fileobj: IO[bytes], prefix: bytes = b"") -> None:
        super().__init__()
        self.fileobj, self.prefix, self.count = fileobj, prefix, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        view = memoryview(buffer).cast("B")
        if self.prefix:  # the magic bytes read to detect the compression, handed back first
            n = min(len(view), len(self.prefix))
            view[:n], self.prefix = self.prefix[:n], self.prefix[n:]
        else:
            data = self.fileobj.read(len(view))
            n = len(data)
            view[:n] = data
        self.count += n
        return n


class _BoundedDecompression(io.RawIOBase):
    """Decompressed bytes from ``stream`` (a gzip/bz2/xz/zstd reader over ``raw``), refused with tarfile.ReadError
    once they pass ``MAX_TAR_EXPANSION`` times the compressed bytes read (after the first ``EXPANSION_GRACE_BYTES``):
    a few hundred bytes of bzip2 can expand to gigabytes of tar that the reader would otherwise work through."""

    def __init__(self, stream: IO[bytes], raw: _CountingReader, errors: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.stream, self.raw, self.errors, self.count = stream, raw, errors, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        try:
            # read1: one read underneath, so bytes decompressed before an error below are not thrown away with it
            data = self.stream.read1(len(buffer))
        except gzip.BadGzipFile as exc:
            if not str(exc).startswith("Not a gzipped file"):
                raise tarfile.ReadError(f"unreadable compressed data after {self.raw.count} bytes ({exc})") from exc
            # raised only where a member header should follow a complete member: trailing bytes that are not gzip,
            # ignored as bzip2 and xz readers (and GNU tar) ignore them
            data = b""
        except self.errors as exc:  # damaged or cut compressed data: the tar is unreadable from here on
            raise tarfile.ReadError(f"unreadable compressed data after {self.raw.count} bytes "
                                    f"({type(exc).__name__}: {exc})") from exc
        n = len(data)
        memoryview(buffer).cast("B")[:n] = data
        self.count += n
        if self.count > EXPANSION_GRACE_BYTES and self.count > MAX_TAR_EXPANSION * max(self.raw.count, 1):
            raise tarfile.ReadError(f"the compressed tar expands more than {MAX_TAR_EXPANSION}x ({self.raw.count} "
                                    f"bytes to over {self.count}): a decompression bomb?")
        return n


DECOMPRESSION_ERRORS = (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)  # what damaged data raises
BZIP2_MAGIC = re.compile(rb"BZh[1-9](1AY&SY|\x17rE8P\x90)", re.DOTALL)  # header + first block (or empty stream)


def _decompressor(magic: bytes, raw: _CountingReader) -> _BoundedDecompression | None:
    """A bounded streaming reader of ``raw``'s decompressed bytes when ``magic`` (its first bytes) names gzip, bzip2,
    xz or zstd; None for anything else (a plain tar)."""
    errors = DECOMPRESSION_ERRORS
    if magic.startswith(b"\x1f\x8b\x08"):
        stream = gzip.GzipFile(fileobj=raw, mode="rb")
    elif BZIP2_MAGIC.match(magic):  # not just "BZh": a plain tar's first member may be named BZhello.txt
        stream = bz2.BZ2File(raw, mode="rb")
    elif magic.startswith(b"\xfd7zXZ\x00"):
        stream = lzma.LZMAFile(raw, mode="rb")
    elif magic.startswith(b"\x28\xb5\x2f\xfd"):
        import zstandard  # lazy: a dependency of apache-beam, needed only for zstd tars

        stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        errors = (*errors, zstandard.ZstdError)
    else:
        return None
    return _BoundedDecompression(stream, raw, errors)


def open_tar_stream(fileobj: IO[bytes]) -> tarfile.TarFile:
    """``fileobj`` as a tar stream whose end ``check_tar_end`` can check. Compression (gzip, bzip2, xz, zstd) is
    detected from the magic bytes and read through a streaming decompressor with an expansion limit: tarfile's own
    decompression (mode "r|*") has none, and copies its buffer on every read (quadratic in the expansion)."""
    magic = b""
    while len(magic) < MAGIC_BYTES:  # a stream may return fewer bytes than asked before its end
        more = fileobj.read(MAGIC_BYTES - len(magic))
        if not more:
            break
        magic += more
    raw = _CountingReader(fileobj, magic)
    compressed = _decompressor(magic, raw)
    stream = io.BufferedReader(compressed) if compressed is not None else raw
    return tarfile.open(fileobj=stream, mode="r|", tarinfo=_EndCheckedTarInfo)  # damaged data: ReadError, above


def _member_kind(info: tarfile.TarInfo) -> str:
    """What a tar member that is not a regular file is, in words."""
    return "symbolic link" if info.issym() else "hard link" if info.islnk() else "special file"


def iter_webdataset(fileobj: IO[bytes], source: str) -> Iterator[RawSample | Reject]:
    """Stream one webdataset tar: one RawSample per key; one Reject per unusable key (however many members it has)
    or for a broken archive (also one whose headers stop before its end marker)."""
    seen: set[str] = set()
    current: str | None = None
    dropped = False  # the current key was rejected: its remaining members are skipped, not rejected again
    members: dict[str, bytes] = {}
    names: set[str] = set()  # the current key's member extensions so far (used or not)
    try:
        with open_tar_stream(fileobj) as tar:
            for info in tar:
                if info.isdir():
                    continue
                key, ext = split_member_name(info.name)
                if not info.isfile() and ext not in USED_EXTENSIONS:
                    continue
                if key == current and ext in names and not dropped:
                    # k.jpg k.txt k.jpg ...: a second copy of the key right after the first. The first copy is
                    # kept and the second is a duplicate_key reject, as for a copy further down the tar.
                    yield _raw_from_members(current, source, members)
                    yield Reject(key, source, "read", f"duplicate_key: {info.name} repeated in this tar")
                    dropped = True
                names.add(ext)
                if key != current:
                    if current is not None and not dropped:
                        yield _raw_from_members(current, source, members)
                    current, members, names, dropped = key, {}, {ext}, key in seen
                    if dropped:
                        yield Reject(key, source, "read", "duplicate_key")
                    seen.add(key)
                if dropped or ext not in USED_EXTENSIONS:  # other members are skipped unread
                    continue
                if not info.isfile():  # a link is never followed (it may point anywhere): the key is unusable
                    yield Reject(key, source, "read", f"not_a_file: {info.name} is a {_member_kind(info)}")
                    dropped = True
                    continue
                if info.size > MAX_MEMBER_BYTES:
                    yield Reject(key, source, "read", f"member_too_large: {info.name} has {info.size} bytes")
                    dropped = True
                    continue
                handle = tar.extractfile(info)
                if handle is not None:
                    members[ext] = handle.read()
            check_tar_end(tar)
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield Reject(f"{source}#{current or 'archive'}", source, "read", f"unreadable_tar: {exc}")
        return
    if current is not None and not dropped:
        yield _raw_from_members(current, source, members)


def folder_unit(source: str, line_number: int, unit_lines: int = FOLDER_UNIT_LINES) -> str:
    """The unit a captions.jsonl line belongs to: 'path#000003' for lines 3001..4000 (1-based)."""
    return f"{source}#{(line_number - 1) // unit_lines:06d}"


def iter_caption_lines(
    lines: Iterable[str | bytes], source: str, unit_lines: int = FOLDER_UNIT_LINES
) -> Iterator[dict | Reject]:
    """Parse captions.jsonl lines into entries {key, image, caption, unit}; bad or duplicate lines become Rejects.

    A line without `key` is keyed by its image's file stem ('images/a.jpg' -> 'a'), the name its ground truth has
    under panoptic/ (panoptic/a.png); two images with one stem are a `duplicate_key`, never a silent overwrite.
    Lines given as bytes must be UTF-8: a line that is not becomes a `bad_caption_encoding` reject.
    """
    seen: dict[str, int] = {}  # key -> its first line
    for number, line in enumerate(lines, start=1):
        unit = folder_unit(source, number, unit_lines)
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Reject(f"{source}:{number}", unit, "read",
                             f"{BAD_CAPTION_ENCODING}: line {number} is not UTF-8 ({exc.reason} at byte {exc.start})")
                continue
        if number == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark some editors write at the start of UTF-8 files
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            yield Reject(f"{source}:{number}", unit, "read", f"malformed_caption_line: line {number}: not JSON "
                         f"({getattr(exc, 'msg', exc)} at column {getattr(exc, 'colno', '?')})")
            continue
        except RecursionError:
            yield Reject(f"{source}:{number}", unit, "read", f"malformed_caption_line: line {number}: nested "
                         "deeper than the JSON parser goes")
            continue
        if not isinstance(entry, dict):
            yield Reject(f"{source}:{number}", unit, "read", f"malformed_caption_line: line {number}: a JSON "
                         f"{type(entry).__name__}, not an object")
            continue
        image = entry.get("image") or entry.get("file_name")
        if image is None:
            yield Reject(f"{source}:{number}", unit, "read", f"malformed_caption_line: line {number}: no \"image\" "
                         f"(or \"file_name\") key; keys are {sorted(entry)[:5]} (names are case-sensitive)")
            continue
        key = entry.get("key")
        if (key is None or key == "") and isinstance(image, str):
            key = posixpath.splitext(posixpath.basename(image))[0]
        wrong = next((f'"{name}" is a {type(value).__name__}, not a {kind}'
                      for name, value, kind in (("key", key, "string or integer"), ("image", image, "string"),
                                                ("caption", entry.get("caption"), "string"))
                      if value is not None and not _fits(value, kind)), None)
        if wrong:
            yield Reject(f"{source}:{number}", unit, "read", f"malformed_caption_line: line {number}: {wrong}")
            continue
        key = str(key)
        if key in seen:
            stem = "" if "key" in entry else ("; keys default to the image's file stem: give \"key\" to tell "
                                              "images of one name in different folders apart")
            yield Reject(key, unit, "read", f"duplicate_key: line {number} repeats the key of line {seen[key]}{stem}")
            continue
        unusable = unencodable_text(key, unit, caption=entry.get("caption"), image=image)
        if unusable:  # before the entry crosses a Beam coder
            yield unusable
            continue
        seen[key] = number
        yield {"key": key, "image": image, "caption": entry.get("caption"), "unit": unit}


def _fits(value: object, kind: str) -> bool:
    """Whether a captions.jsonl value has the type `kind` names ("string", or "string or integer" for keys)."""
    if kind == "string":
        return isinstance(value, str)
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def outside_corpus(relative: str) -> bool:
    """Whether a path from captions.jsonl leaves the corpus root: absolute, a URL, or climbing out with '..'."""
    return (posixpath.isabs(relative) or relative.startswith("\\") or "://" in relative
            or ".." in relative.replace("\\", "/").split("/"))


class FileRefused(ValueError):
    """A corpus file that is not read: outside its root (e.g. through a symlink), not a regular file, or too large;
    `reason` is the reject reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def read_optional(path: str, root: str | None = None, limit: int = MAX_MEMBER_BYTES) -> bytes | None:
    """A file's bytes, or None if it does not exist; FileRefused for a local file whose real path (symlinks
    resolved) leaves `root`, for anything but a regular file (a FIFO or /dev/zero would never end), and for a file
    over `limit` bytes (checked before reading, like a tar member)."""
    if not FileSystems.exists(path):
        return None
    if "://" not in path:
        real = os.path.realpath(path)
        if root is not None and not within(real, root):
            raise FileRefused(OUTSIDE_CORPUS, f"{path!r} leads to {real!r}, outside {root!r}")
        info = os.stat(real)
        if not stat.S_ISREG(info.st_mode):
            raise FileRefused("not_a_file", f"{path!r} is not a regular file")
        size = info.st_size
    try:
        if "://" in path:
            size = next((m.size_in_bytes for m in match_in(path)), 0)
        if size > limit:
            raise FileRefused("member_too_large", f"{path!r} has {size} bytes (limit {limit})")
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            data = handle.read(limit + 1)  # never more than the limit, should the file grow meanwhile
    except FileRefused:
        raise
    except Exception:  # any storage error (GCS's NotFound is no OSError): a file gone meanwhile is as absent
        if FileSystems.exists(path):
            raise
        return None
    if len(data) > limit:
        raise FileRefused("member_too_large", f"{path!r} has more than {limit} bytes")
    return data


def load_folder_entry(entry: dict, root: str) -> RawSample | Reject:
    """Read one folder entry's image and optional panoptic ground truth (panoptic/KEY.png + .json)."""
    key, source = entry["key"], entry.get("unit") or FileSystems.join(root, CAPTIONS_FILE)
    for what, relative in (("image", entry.get("image")), ("key", key)):
        if isinstance(relative, str) and outside_corpus(relative):
            return Reject(key, source, "read", f"{OUTSIDE_CORPUS}: {what} {relative!r} is not a relative path "
                          f"inside {root!r}")
    image_path = FileSystems.join(root, entry["image"]) if entry.get("image") else None
    try:
        image = read_optional(image_path, root) if image_path else None
        panoptic_png = read_optional(FileSystems.join(root, "panoptic", f"{key}.png"), root)
        panoptic_json = read_optional(FileSystems.join(root, "panoptic", f"{key}.json"), root)
    except FileRefused as exc:
        return Reject(key, source, "read", str(exc))
    except OSError as exc:
        return Reject(key, source, "read", f"unreadable_file: {exc}")
    if image_path and image is None:  # named but absent (an entry naming no image is decode's missing_image)
        return Reject(key, source, "read", f"missing_image: {entry['image']!r} does not exist in {root!r}")
    annotation = _parse_json(panoptic_json)
    return RawSample(key, source, image, entry.get("caption"), panoptic_png, annotation)


class _ReadTar(beam.DoFn):
    """One webdataset tar -> RawSamples, with Rejects on 'rejects' and (tar, items read) on 'counts'."""

    def __init__(self) -> None:
        self.read = beam.metrics.Metrics.counter("spatext_read", "samples_read")
        self.rejected = beam.metrics.Metrics.counter("spatext_read", "rejected")

    def process(self, path: str) -> Iterator:
        count = 0
        # uncompressed: iter_webdataset detects compression from the bytes, and decompresses with a limit
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            for item in iter_webdataset(handle, path):
                count += 1
                yield from route_item(item, self.read, self.rejected)
        yield beam.pvalue.TaggedOutput(COUNTS, (path, count))


def unencodable_text(key: str, source: str, **texts: object) -> Reject | None:
    """A Reject for a sample whose key or other text (caption, file names) UTF-8 cannot encode: lone surrogates, from
    a tar member or file name that is not UTF-8 or a '\\ud800' escape in JSON, which Beam's coders and Parquet
    refuse. Without this check one such sample failed the whole job, or the whole model batch it was in."""
    for name, value in (("key", key), *texts.items()):
        if isinstance(value, str) and not utf8_encodable(value):
            code = {"caption": BAD_CAPTION_ENCODING, "label": BAD_LABEL_ENCODING}.get(name, BAD_NAME_ENCODING)
            return Reject(key, source, "read", f"{code}: the {name} {ascii(value)[:160]} holds characters UTF-8 "
                          "cannot encode (a name that is not UTF-8, or a lone surrogate escape in JSON)")
    return None


def unencodable_label(annotation: object) -> str | None:
    """The first string in a ground truth's ``segments_info`` entries (a category name, say) that UTF-8 cannot
    encode, or None: labels are written to the shards, where such a string would fail the job."""
    segments = annotation.get("segments_info") if isinstance(annotation, dict) else None
    for segment in segments if isinstance(segments, list) else ():
        for value in segment.values() if isinstance(segment, dict) else ():
            if isinstance(value, str) and not utf8_encodable(value):
                return value
    return None


def route_item(item: RawSample | Reject, read_counter, reject_counter) -> Iterator:
    """Send Rejects (and samples whose key or caption UTF-8 cannot encode) to the tagged output, everything else
    to the main one."""
    if isinstance(item, RawSample):
        item = unencodable_text(item.key, item.source, caption=item.caption,
                                label=unencodable_label(item.annotation)) or item
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
            for item in iter_caption_lines(handle, path):  # bytes lines: each is decoded strictly
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
        yield from route_item(load_folder_entry(entry, self.root), self.read, self.rejected)


class ReadCorpus(beam.PTransform):
    """Read a corpus; returns {"samples": RawSamples, "rejects": Rejects, "counts": (unit source, items read)}.

    `options` is a ReadOptions (or just the format's name). Units (tars, parquet files, chunks of captions.jsonl or of
    a COCO split) whose source is in `skip` — completed by an earlier run — are not read.
    """

    def __init__(self, pattern: str, options: ReadOptions | str = "auto", skip: Iterable[str] = ()) -> None:
        super().__init__()
        self.options = ReadOptions(input_format=options) if isinstance(options, str) else options
        self.pattern = pattern
        self.input_format = check_input(pattern, self.options)
        self.skip = frozenset(skip)

    def expand(self, pbegin):
        if self.input_format == "parquet":
            from spatext.pipeline.read_parquet import ReadParquet  # lazy: read_parquet builds on this module

            files = match_files(self.pattern)
            if not files:
                raise ValueError(f"--input {self.pattern!r} matches no file")
            return pbegin | "Parquet" >> ReadParquet(files, self.options, self.skip)
        if self.input_format == "coco":
            from spatext.pipeline.read_coco import ReadCoco, find_coco

            layout = find_coco(self.pattern, self.options.coco_split)
            return pbegin | "Coco" >> ReadCoco(layout, self.skip, self.options.coco_unit_images)
        if self.input_format == "webdataset":
            return self._expand_webdataset(pbegin)
        return self._expand_folder(pbegin)

    def _expand_webdataset(self, pbegin) -> dict:
        """Tars -> samples, one unit per tar."""
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

    def _expand_folder(self, pbegin) -> dict:
        """captions.jsonl (in units of lines) -> entries -> images read after a Reshuffle."""
        root = posixpath.dirname(folder_captions(self.pattern))
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
    """Whether the corpus carries panoptic ground truth: coco always, parquet never, else a look at the files.

    Tars are probed in order until one has a member: unreadable or empty tars are skipped (the read stage turns them
    into rejects). When no tar has a member, no sample can reach the segmenter, so the answer is True: `annotations`
    loads no model, and every input still ends as a read reject.
    """
    fmt = detect_format(pattern) if input_format == "auto" else input_format
    if fmt in ("coco", "parquet"):
        return fmt == "coco"
    if fmt == "folder":
        root = pattern.rstrip("/")
        root = posixpath.dirname(root) if root.endswith(CAPTIONS_FILE) else root
        return bool(match_in(root, "panoptic", "*.png", limit=1))
    files = match_files(pattern)
    for path in files:
        found = probe_tar(path, probe_members)
        if found is not None:
            return found
    logger.warning("--segmenter auto: none of the %d input tar(s) has a readable member; every input will be a "
                   "read reject", len(files))
    return True


def probe_tar(path: str, probe_members: int = 64) -> bool | None:
    """Whether a tar's first `probe_members` file members include a panoptic PNG; None when the tar is unreadable
    or holds no file member (it says nothing about the corpus)."""
    seen = 0
    try:
        with (FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle,
              open_tar_stream(handle) as tar):
            for info in tar:
                if not info.isfile():
                    continue
                if split_member_name(info.name)[1] == "panoptic.png":
                    return True
                seen += 1
                if seen >= probe_members:
                    break
    except (tarfile.TarError, OSError, EOFError) as exc:
        logger.warning("--segmenter auto: skipping %s while probing for ground truth (unreadable: %s)", path, exc)
    return (False if seen else None)
