"""Parquet corpora (img2dataset's parquet output, Hugging Face datasets): one RawSample per row, streamed.

Columns, resolved per file from its schema: an explicit name (``--image-column``, ``--caption-column``,
``--key-column``) wins; otherwise the first present of IMAGE_COLUMNS / CAPTION_COLUMNS / KEY_COLUMNS; either way the
exact name first, then case-insensitively. The launcher checks the first file (fail fast); every row of a later file
whose columns cannot be resolved becomes an ``unusable_columns`` reject (keyed ``{name}/{row}``). An image cell is
bytes or a Hugging Face Image struct ``{bytes, path}``. Keys: the key column's value, else ``"{name}/{row}"`` where
name is the file's path relative to the input files' common folder, without ``.parquet`` (``train/0000/5`` and
``test/0000/5`` for a Hugging Face dataset's ``default/{train,test}/0000.parquet``; the file stem when all files share
a folder), so default keys are unique across the input set.

Rows are rejected at read only for what the reader knows and decode cannot: img2dataset's failed downloads
(``status`` != "success" -> ``download_failed: <error_message>``) and rows with a URL but no image bytes
(``url_only``: downloading is img2dataset's job). A row with neither image nor URL flows on and decode rejects it as
``missing_image``, like the other readers. The unit of work is one file: its path is every row's source. Files are
read row batch by row batch, with only the needed columns: local ones by Arrow itself, others through Beam's
FileSystems (see ``spatext.pipeline.parquet_files``).
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import IO

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from spatext.pipeline.parquet_files import streaming_source
from spatext.pipeline.read import BAD_CAPTION_ENCODING, COUNTS, MAX_MEMBER_BYTES, REJECTS, ReadOptions, route_item
from spatext.pipeline.records import RawSample, Reject

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("jpg", "image", "img", "image_bytes", "png", "webp")
CAPTION_COLUMNS = ("caption", "txt", "text", "prompt")
KEY_COLUMNS = ("key", "id")
URL_COLUMNS = ("url", "image_url")
STATUS_COLUMN, ERROR_COLUMN = "status", "error_message"  # img2dataset's download outcome
BATCH_ROWS = 16  # rows decoded at a time (at most): memory stays at a few MB of images per file being read
BATCH_BYTES = 64 << 20  # fewer rows per batch where the footer says rows are bigger than BATCH_BYTES / BATCH_ROWS
# A row group is read a column chunk at a time: one whose read columns unpack to more than this is refused from the
# footer, unread (img2dataset's shards of 10k images of ~50 KB are ~0.5 GB). A row with a cell (image, caption, key,
# ...) over MAX_MEMBER_BYTES (the tar member cap) is a reject, found from Arrow's lengths before the row becomes
# Python objects: a footer can under-report sizes, and dictionary encoding repeats one big value in many rows.
MAX_COLUMN_CHUNK_BYTES = 2 << 30
URL_ONLY = "url_only: download images first (e.g. with img2dataset)"


@dataclass(frozen=True)
class ParquetColumns:
    """The columns one parquet corpus is read from (None = the corpus has no such column)."""

    image: str
    caption: str
    key: str | None = None
    url: str | None = None
    status: str | None = None
    error: str | None = None

    def names(self) -> list[str]:
        """The columns to read, each once."""
        fields = (self.image, self.caption, self.key, self.url, self.status, self.error)
        return list(dict.fromkeys(c for c in fields if c))


def _pick(names: Sequence[str], candidates: Sequence[str]) -> str | None:
    """The first candidate present in `names`: exact match first, then case-insensitive."""
    for candidate in candidates:
        if candidate in names:
            return candidate
    folded = {name.casefold(): name for name in reversed(names)}
    return next((folded[c.casefold()] for c in candidates if c.casefold() in folded), None)


def _is_image_type(kind: pa.DataType) -> bool:
    """Binary, or a struct with a binary `bytes` field (Hugging Face's Image feature)."""
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        return _is_image_type(kind.field("bytes").type)
    return False


def resolve_columns(schema: pa.Schema, path: str, options: ReadOptions) -> ParquetColumns:
    """The columns to read from a file with `schema`; ValueError naming the file and listing its columns if unusable.

    An explicit flag's name follows the same rule as the defaults: the exact name first, then ignoring case."""
    names = list(schema.names)
    listing = f"its columns: {', '.join(f'{n} ({schema.field(n).type})' for n in names)}"
    chosen: dict[str, str | None] = {}
    for flag, value in (("--image-column", options.image_column), ("--caption-column", options.caption_column),
                        ("--key-column", options.key_column)):
        chosen[flag] = None if value is None else _pick(names, [value])
        if value is not None and chosen[flag] is None:
            raise ValueError(f"{flag} {value!r} is not a column of {path!r}; {listing}")
    url = _pick(names, URL_COLUMNS)
    image = chosen["--image-column"] or _pick(names, IMAGE_COLUMNS)
    if image is None:
        binary = [n for n in names if _is_image_type(schema.field(n).type)]
        if binary:
            hint = f"pass --image-column {binary[0]} (columns holding bytes: {', '.join(binary)})"
        elif url:
            hint = "it has URLs but no image bytes: download images first (e.g. with img2dataset)"
        else:
            hint = "no column holds image bytes; pass --image-column"
        raise ValueError(f"{path!r}: no image column (looked for {', '.join(IMAGE_COLUMNS)}); {hint}; {listing}")
    if not _is_image_type(schema.field(image).type):
        raise ValueError(f"{path!r}: image column {image!r} must hold bytes or a {{bytes, path}} struct, "
                         f"not {schema.field(image).type}; {listing}")
    caption = chosen["--caption-column"] or _pick(names, CAPTION_COLUMNS)
    if caption is None:
        raise ValueError(f"{path!r}: no caption column (looked for {', '.join(CAPTION_COLUMNS)}); "
                         f"pass --caption-column; {listing}")
    status = STATUS_COLUMN if STATUS_COLUMN in names else None
    return ParquetColumns(
        image=image, caption=caption, key=chosen["--key-column"] or _pick(names, KEY_COLUMNS), url=url,
        status=status, error=ERROR_COLUMN if status and ERROR_COLUMN in names else None,
    )


def open_parquet(path: str) -> AbstractContextManager[IO[bytes] | str]:
    """What ``pq.ParquetFile`` reads for ``path`` (``streaming_source``: corpus files are big, they stream)."""
    return streaming_source(path, lambda p: FileSystems.open(p, compression_type=CompressionTypes.UNCOMPRESSED))


def columns_for(path: str, options: ReadOptions) -> ParquetColumns:
    """Resolve the columns from one file's footer (the launcher's fail-fast check); ValueError if unusable."""
    try:
        with open_parquet(path) as handle:
            schema = pq.ParquetFile(handle).schema_arrow
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"--input: {path!r} is not a readable parquet file: {exc}") from exc
    return resolve_columns(schema, path, options)


def _image_cell(value: object) -> tuple[bytes | None, str | None]:
    """(image bytes, path) of a cell holding bytes or a {bytes, path} struct; empty bytes count as none."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value) or None, None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        return (bytes(data) or None) if data is not None else None, path if isinstance(path, str) else None
    return None, None


def _caption_cell(value: object) -> str | None:
    """A caption cell as text: a string, UTF-8 bytes (a binary column), the first string of a list, or None.

    Bytes that are not UTF-8 raise UnicodeDecodeError (the row becomes a reject): never ``str(b'...')`` or a lossy
    decode stored as the caption."""
    if isinstance(value, list | tuple):
        value = next((v for v in value if isinstance(v, str | bytes)), None)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return None if value is None else str(value)


def row_to_item(row: dict, key: str, source: str, columns: ParquetColumns) -> RawSample | Reject:
    """One parquet row -> RawSample, or a Reject for a failed download or a URL-only row."""
    status = row.get(columns.status) if columns.status else None
    if status is not None and status != "success":
        detail = (row.get(columns.error) if columns.error else None) or status
        return Reject(key, source, "read", f"download_failed: {detail}")
    image, path = _image_cell(row.get(columns.image))
    url = row.get(columns.url) if columns.url else None
    if not url and path and path.startswith(("http://", "https://")):
        url = path
    if image is None and url:
        return Reject(key, source, "read", URL_ONLY)
    try:
        caption = _caption_cell(row.get(columns.caption))
    except UnicodeDecodeError as exc:
        return Reject(key, source, "read", f"{BAD_CAPTION_ENCODING}: column {columns.caption!r} is not UTF-8 "
                      f"({exc.reason} at byte {exc.start})")
    return RawSample(key, source, image, caption)


def common_folder(files: Sequence[str]) -> str:
    """The deepest folder that holds every file ('' when they share none): the root default keys are relative to."""
    parts = [f.split("/")[:-1] for f in files]
    common: list[str] = []
    for names in zip(*parts, strict=False):
        if any(n != names[0] for n in names):
            break
        common.append(names[0])
    return "/".join(common)


def key_name(path: str, root: str) -> str:
    """A file's name in default keys: its path below `root`, without the .parquet extension."""
    name = path[len(root) + 1 :] if root and path.startswith(root + "/") else path
    return name[: -len(".parquet")] if name.endswith(".parquet") else name


def _row_key(row: dict, stem: str, index: int, columns: ParquetColumns) -> str:
    """The key column's value, else '{file name}/{row index}'."""
    value = row.get(columns.key) if columns.key else None
    return f"{stem}/{index}" if value is None or value == "" else str(value)


def iter_parquet(
    fileobj: IO[bytes] | str, source: str, options: ReadOptions, batch_rows: int = BATCH_ROWS, root: str | None = None
) -> Iterator[RawSample | Reject]:
    """Stream one parquet file: one item per row; duplicate keys, unusable columns or a broken file become Rejects.

    `root`: the input files' common folder (``common_folder``); default keys name the file relative to it (None:
    the file's own folder, i.e. its stem)."""
    stem = key_name(source, posixpath.dirname(source) if root is None else root)
    seen: set[str] = set()
    index = 0
    try:
        parquet = pq.ParquetFile(fileobj)
        try:
            columns = resolve_columns(parquet.schema_arrow, source, options)
        except ValueError as exc:  # one reject per row, so that read counts rows here as in every other file
            for row in range(parquet.metadata.num_rows):
                yield Reject(f"{stem}/{row}", source, "read", f"unusable_columns: {exc}")
            return
        names = columns.names()
        for group in range(parquet.metadata.num_row_groups):
            meta = parquet.metadata.row_group(group)
            size = sum(meta.column(c).total_uncompressed_size for c in range(meta.num_columns)
                       if meta.column(c).path_in_schema.split(".")[0] in names)
            if size > MAX_COLUMN_CHUNK_BYTES:
                for _ in range(meta.num_rows):
                    yield Reject(f"{stem}/{index}", source, "read", f"member_too_large: row group {group}'s columns "
                                 f"{', '.join(names)} unpack to {size} bytes (limit {MAX_COLUMN_CHUNK_BYTES})")
                    index += 1
                continue
            end = index + meta.num_rows
            rows_per_batch = max(1, min(batch_rows, BATCH_BYTES * meta.num_rows // max(size, 1)))
            try:
                for batch in parquet.iter_batches(batch_size=rows_per_batch, row_groups=[group], columns=names):
                    for row in _batch_rows(batch):
                        if isinstance(row, str):  # a cell over the cap, unread: why
                            yield Reject(f"{stem}/{index}", source, "read", row)
                            index += 1
                            continue
                        key = _row_key(row, stem, index, columns)
                        index += 1
                        if key in seen:
                            yield Reject(key, source, "read", "duplicate_key")
                            continue
                        seen.add(key)
                        yield row_to_item(row, key, source, columns)
            except (pa.ArrowException, OSError, ValueError) as exc:  # a damaged row group (ValueError: bytes of a
                # string column that are not UTF-8): its unread rows are rejects (the footer counts them), and the
                # next row group is read on (each has its own column chunks)
                reason = f"unreadable_parquet: row group {group}, rows {index}..{end - 1} unread: {exc}"
                for row in range(index, end):
                    yield Reject(f"{stem}/{row}", source, "read", reason)
                index = end
    except (pa.ArrowException, OSError) as exc:  # no footer: how many rows the file had is unknown
        yield Reject(f"{source}#{index if index else 'file'}", source, "read", f"unreadable_parquet: {exc}")


def cell_bytes(array: pa.Array) -> np.ndarray:
    """The bytes of variable-size data each row's cell holds (strings and binaries, also inside structs, lists and
    dictionaries), from Arrow's offsets: nothing is copied out. Nulls and fixed-width values count 0; a type this
    cannot size (a map or list view: no corpus column is one) is a ValueError, so its row group becomes rejects,
    never a cell counted as empty."""
    kind = array.type
    if isinstance(kind, pa.BaseExtensionType):  # e.g. arrow.json: sized by the values it stores
        return cell_bytes(array.storage)
    if pa.types.is_dictionary(kind):  # each row holds its index's value (one big value may repeat in every row)
        values = cell_bytes(array.dictionary)
        valid = ~array.is_null().to_numpy(zero_copy_only=False)
        sizes = np.zeros(len(array), np.int64)
        sizes[valid] = values[array.indices.to_numpy(zero_copy_only=False)[valid].astype(np.int64)]
        return sizes
    if pa.types.is_struct(kind):
        total = np.zeros(len(array), np.int64)
        for child in array.flatten():
            total += cell_bytes(child)
        return total
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
        return np.bincount(parents, weights=cell_bytes(array.flatten()), minlength=len(array)).astype(np.int64)
    if pa.types.is_binary_view(kind) or pa.types.is_string_view(kind):
        array = array.cast(pa.large_binary())  # no length kernel for view types
        kind = array.type
    if pa.types.is_binary(kind) or pa.types.is_string(kind) or pa.types.is_large_binary(kind) or \
            pa.types.is_large_string(kind) or pa.types.is_fixed_size_binary(kind):
        return pc.fill_null(pc.binary_length(array), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_null(kind) or _fixed_width(kind):  # bounded by the row count
        return np.zeros(len(array), np.int64)
    raise ValueError(f"a column of type {kind} cannot be size-checked before it is read")


def _fixed_width(kind: pa.DataType) -> bool:
    """Whether values of ``kind`` have a fixed size (numbers, booleans, timestamps, decimals, ...)."""
    try:
        return kind.bit_width > 0
    except ValueError:  # pyarrow: "Non-fixed width type"
        return False


def _batch_rows(batch: pa.RecordBatch) -> Iterator[dict | str]:
    """A batch's rows as dicts, in order; a row with a cell over MAX_MEMBER_BYTES is the reason it is refused
    instead (its cells never become Python objects)."""
    sizes = {name: cell_bytes(batch.column(i)) for i, name in enumerate(batch.schema.names)}
    over = np.zeros(batch.num_rows, bool)
    for column in sizes.values():
        over |= column > MAX_MEMBER_BYTES
    if not over.any():
        yield from batch.to_pylist()
        return
    kept = iter(batch.filter(pa.array(~over)).to_pylist())
    for row in range(batch.num_rows):
        if over[row]:
            name = max(sizes, key=lambda n: sizes[n][row])
            yield f"member_too_large: column {name!r} holds {sizes[name][row]} bytes (limit {MAX_MEMBER_BYTES})"
        else:
            yield next(kept)


class _ReadParquetFile(beam.DoFn):
    """One parquet file -> RawSamples, with Rejects on 'rejects' and (file, rows read) on 'counts'."""

    def __init__(self, options: ReadOptions, batch_rows: int = BATCH_ROWS, root: str | None = None) -> None:
        self.options, self.batch_rows, self.root = options, batch_rows, root
        self.read = beam.metrics.Metrics.counter("spatext_read", "samples_read")
        self.rejected = beam.metrics.Metrics.counter("spatext_read", "rejected")

    def process(self, path: str) -> Iterator:
        count = 0
        with open_parquet(path) as handle:
            for item in iter_parquet(handle, path, self.options, self.batch_rows, self.root):
                count += 1
                yield from route_item(item, self.read, self.rejected)
        yield beam.pvalue.TaggedOutput(COUNTS, (path, count))


class ReadParquet(beam.PTransform):
    """Parquet files -> {"samples", "rejects", "counts"}; each file's columns are resolved from its own schema.

    The first file is checked here, on the launcher, so a corpus whose columns cannot be resolved fails fast.
    """

    def __init__(self, files: Sequence[str], options: ReadOptions, skip: frozenset[str] = frozenset()) -> None:
        super().__init__()
        if not files:
            raise ValueError("--input matches no parquet file")
        self.files, self.options, self.skip = list(files), options, skip
        logger.info("parquet input: %d file(s); %s: %s", len(files), files[0], columns_for(files[0], options))

    def expand(self, pbegin) -> dict:
        read = (
            pbegin
            | "ListParquet" >> beam.Create([f for f in self.files if f not in self.skip])
            | "SpreadParquet" >> beam.Reshuffle()
            | "ReadParquet" >> beam.ParDo(_ReadParquetFile(self.options, root=common_folder(self.files)))
            .with_outputs(REJECTS, COUNTS, main="samples")
        )
        return {"samples": read.samples, REJECTS: read[REJECTS], COUNTS: read[COUNTS]}
