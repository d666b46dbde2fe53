"""Streaming training data over spatext shards (schema v1) on any fsspec path.

`ShardDataset` reads the Parquet shards the pipeline writes and yields decoded, cropped training samples:

1. The work unit is a slice of one row group of one file. Units are planned from the files' footers (read once, in
   `__init__`), laid end to end and cut into equal row ranges, one per distributed rank, each cut again across the
   rank's DataLoader workers: every consumer gets the same number of rows to within one (a cut inside a row group
   gives two slices of it, each read by its consumer).
2. The order of the units is a permutation drawn from (seed, epoch); `set_epoch` reshuffles. Every row is seen
   exactly once per epoch over all ranks x workers (tested), given the same file list, seed, epoch and world size.
3. Within a worker, rows pass through a shuffle buffer (random generator from (seed, epoch, rank, worker)).
4. Each row is decoded and cropped: the image and its segment map get the same box (the centred square of the
   shorter side) resized to R x R, bilinear (antialiased, PIL's filter) for the image and nearest for the map.
   JPEGs are decoded by torchvision (libjpeg-turbo, the same pixels as PIL; other formats by PIL) and resized by
   torch's uint8 resize on one thread; a JPEG whose box is >= 4R pixels across is instead decoded at a reduced DCT
   scale (PIL's `draft`: 1/4 or 1/8, never below R pixels; see `MIN_DCT_SCALE`) and resized by PIL with the box
   rescaled exactly. A box already R pixels across is only cropped.
5. Segments are renumbered 1..k in stored order through a 256-entry lookup table; segments the crop removed are
   dropped; with `resample_segments` a random non-empty subset is kept (seeded by (seed, epoch, key)).
6. Pixels leave the dataset as float32 in [-1, 1] by default. With `uint8=True` they stay uint8 (0..255), and so does
   the label map: 4x / 8x fewer bytes through collate, worker shared memory and the host-to-device copy, and no
   per-sample float conversion on the CPU. uint8 pixels lie in channels-last memory (R x R x 3 buffers viewed as
   3 x R x R; `collate` keeps that layout), as the decoder and the resize produce them: a planar copy would cost
   more than the resize saves. The training loop then calls `to_model_input` on the device (x / 127.5 - 1,
   the same float32 arithmetic as the CPU path). Label maps of either dtype go to `build_st` as they are.
7. With `decode_threads=N` each consumer (the main process, or each DataLoader worker) decodes N rows at a time in
   threads, in order: the same samples in the same order as one thread. Decoding releases the GIL, so on few cores
   threads in the main process beat worker processes, whose batches cost a copy into fresh shared memory (21 ms
   per 32 x 3 x 512 x 512 uint8 batch, against 1-3 ms for a stack in the main process; measured). The threads work
   up to `decode_ahead` samples (default 64, about a batch) ahead of the consumer, so in the main process too
   decoding overlaps the training step, as worker processes do.

`shuffle_buffer=0` turns all shuffling off (units in file order, rows in stored order), for evaluation.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from fsspec.core import url_to_fs
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from spatext.pipeline.keys import key_hash
from spatext.pipeline.parquet_files import streaming_parquet
from spatext.pipeline.resize import resize_chw
from spatext.pipeline.schema import SCHEMA_VERSION, read_metadata
from spatext.pipeline.write import SHARDS_DIR, SUFFIX

logger = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")

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
        root = _escape_glob(path.rstrip("/"))  # a folder named 'run[1]' is a folder, not a pattern
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


def _escape_glob(path: str) -> str:
    """`path` with glob characters bracketed, so that a glob of it matches the literal name."""
    return re.sub(r"([*?[])", r"[\1]", path)


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


def shuffle_buffer_iter(rows: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Reservoir-style shuffle buffer: fill `size` rows, then emit a random one for each new row."""
    if size <= 1:
        yield from rows
        return
    buffer: list = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        j = int(rng.integers(len(buffer)))
        yield buffer[j]
        buffer[j] = row
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


def crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square of the shorter side: the crop that 'shorter side to R, centre crop' takes."""
    side = min(width, height)
    x0, y0 = (width - side) // 2, (height - side) // 2
    return x0, y0, x0 + side, y0 + side


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread, restoring the count after (a process-wide setting: use it only from the
    thread that iterates the dataset). One image is too small to split: on a busy 2-core machine a 256 px resize took
    2.0 ms on 2 threads and 0.31 ms on one (measured). DataLoader workers already run on one thread."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def is_jpeg(data: bytes) -> bool:
    """Whether encoded image bytes are a JPEG (SOI marker)."""
    return data[:3] == b"\xff\xd8\xff"


# Reduced-scale decoding pays from 1/4 on: Huffman decoding, which scaling does not shrink, dominates, and PIL's
# decode + resize at 1/2 took 0.95 ms vs 0.85 ms for torchvision's full decode + torch's resize (1/4: 0.64 vs 0.82 ms,
# 1/8: 0.52 vs 0.77 ms; 512 px JPEGs, measured on this 2-core machine).
MIN_DCT_SCALE = 4


def dct_scale(size: tuple[int, int], box: tuple[int, int, int, int], resolution: int) -> int:
    """The factor (1, 2, 4 or 8) by which a JPEG of `size` (W, H) can be decoded when `box` is resized to R x R: the
    largest DCT scale that keeps >= R pixels across the box (PIL's `draft` rule)."""
    side = box[2] - box[0]
    if side <= resolution:
        return 1
    want = (max(1, size[0] * resolution // side), max(1, size[1] * resolution // side))
    scale = min(size[0] // want[0], size[1] // want[1])
    return next(a for a in (8, 4, 2, 1) if scale >= a)


def decode_rgb(data: bytes) -> torch.Tensor:
    """Image bytes -> 3 x H x W uint8 RGB tensor (channels-last memory for JPEG): torchvision for JPEG, else PIL."""
    if is_jpeg(data):
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    with Image.open(io.BytesIO(data)) as im:
        return torch.from_numpy(np.array(im if im.mode == "RGB" else im.convert("RGB"))).permute(2, 0, 1)


def channels_last(image: torch.Tensor) -> torch.Tensor:
    """A 3 x H x W tensor in channels-last memory (an H x W x 3 buffer): itself when it already lies so, else a
    copy. The loader keeps pixels in this layout from the decoder to the device (see `to_model_input`)."""
    if image.permute(1, 2, 0).is_contiguous():
        return image
    return image.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def resize_crop(image: torch.Tensor, box: tuple[int, int, int, int], resolution: int) -> torch.Tensor:
    """Crop `box` of a 3 x H x W uint8 image and resize it to 3 x R x R uint8 in channels-last memory, bilinear with
    antialiasing (torch's port of PIL's filter; pixels outside the box are not read). A box R pixels across is
    only cropped (a compact copy).

    The box is first copied to a compact channels-last buffer and resized in that layout, which torch's uint8
    kernel does fastest: 0.33 ms per ~400 px box to 512 px, against 0.70 ms from the strided crop view to planar
    memory (0.57 ms when only the output is converted to planar afterwards; measured).
    """
    x0, y0, x1, y1 = box
    with single_thread():
        crop = torch.empty((1, 3, y1 - y0, x1 - x0), dtype=torch.uint8, memory_format=torch.channels_last)
        crop.copy_(image[None, :, y0:y1, x0:x1])
        return channels_last(resize_chw(crop, (resolution, resolution), mode="bilinear")[0])


def load_image_crop(
    data: bytes, box: tuple[int, int, int, int], resolution: int, size: tuple[int, int]
) -> torch.Tensor:
    """Decode image bytes and resize `box` (original pixel coordinates) to a 3 x R x R uint8 RGB tensor, bilinear.

    A JPEG with `dct_scale` >= `MIN_DCT_SCALE` is decoded at that reduced DCT scale (PIL's `draft`) and resized by
    PIL with the box rescaled by the exact scale, so the result stays aligned with the segment map; any other image
    is decoded in full and resized by `resize_crop`. `size` is the expected (W, H).
    """
    if not (is_jpeg(data) and dct_scale(size, box, resolution) >= MIN_DCT_SCALE):
        image = decode_rgb(data)
        if (image.shape[2], image.shape[1]) != size:
            raise ValueError(f"image is {image.shape[2]}x{image.shape[1]} but its segment map is {size[0]}x{size[1]}")
        return resize_crop(image, box, resolution)
    with Image.open(io.BytesIO(data)) as im:
        if im.size != size:
            raise ValueError(f"image is {im.size[0]}x{im.size[1]} but its segment map is {size[0]}x{size[1]}")
        side = box[2] - box[0]
        drafted = im.draft("RGB", (max(1, size[0] * resolution // side), max(1, size[1] * resolution // side)))
        scale = size[0] / drafted[1][2] if drafted is not None else 1.0  # None: PIL could not draft this file
        small = im.resize((resolution, resolution), Image.Resampling.BILINEAR, box=tuple(v / scale for v in box))
        return torch.from_numpy(np.array(small)).permute(2, 0, 1)  # channels-last, like resize_crop


def load_label_crop(data: bytes, resolution: int) -> tuple[Image.Image, tuple[int, int]]:
    """Decode a stored segment map (single-channel PNG) and resize its `crop_box` to R x R, nearest; returns the
    mode-L label image and the map's (W, H)."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode != "L":
            raise ValueError(f"segment_map must be a single-channel (L) PNG, got mode {im.mode}")
        return im.resize((resolution, resolution), Image.Resampling.NEAREST, box=crop_box(*im.size)), im.size


def renumber(labels: np.ndarray, keep: np.ndarray, histogram: np.ndarray | None = None) -> np.ndarray:
    """H x W uint8 stored indices -> H x W uint8 with keep[i] as i + 1 and every other index as 0 (one 256-entry
    lookup table, `np.take`). Given the map's 256-bin `histogram`, a table that maps every value present to itself
    (stored indices 1..k, all kept: the usual case) returns `labels` itself instead of a copy."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[keep] = np.arange(1, len(keep) + 1)
    if histogram is not None:
        values = np.flatnonzero(histogram)
        if np.array_equal(lut[values], values):
            return labels
    return np.take(lut, labels)


def choose_segments(
    present: np.ndarray, resample: bool, max_segments: int, rng: np.random.Generator | None, key: str
) -> np.ndarray:
    """Stored indices to keep, in stored order: all present ones, or a random non-empty subset when resampling."""
    if resample and len(present):
        count = int(rng.integers(1, min(len(present), max_segments) + 1))
        return np.sort(rng.choice(present, size=count, replace=False))
    if len(present) > max_segments:
        raise ValueError(f"max_segments={max_segments} but sample {key!r} has {len(present)} segments; "
                         "raise max_segments or pass resample_segments=True")
    return present


def to_sample(
    raw: dict, resolution: int, max_segments: int, resample_rng: np.random.Generator | None, uint8: bool = False
) -> dict:
    """One raw shard row -> the training sample dict (see ShardDataset)."""
    small, size = load_label_crop(raw["segment_map"], resolution)
    stored = raw["segment_index"]
    histogram = np.asarray(small.histogram())
    present = stored[histogram[stored] > 0]  # the segments the crop left
    keep = choose_segments(present, resample_rng is not None, max_segments, resample_rng, raw["key"])
    labels = renumber(np.array(small), keep, histogram)  # np.array: a writable copy torch may share
    image = load_image_crop(raw["image"], crop_box(*size), resolution, size)
    dim = raw["caption_embedding"].shape[0]
    embeddings = np.zeros((max_segments, dim), dtype=np.float32)
    position = {int(index): row for row, index in enumerate(stored)}
    embeddings[: len(keep)] = raw["segment_embeddings"][[position[int(index)] for index in keep]]
    if uint8:
        pixels, label_map = image, torch.from_numpy(labels)
    else:  # numpy: no intra-op threads
        array = image.numpy().astype(np.float32, order="C")  # planar float
        array /= 127.5
        array -= 1.0
        pixels, label_map = torch.from_numpy(array), torch.from_numpy(labels.astype(np.int64))
    return {
        "pixel_values": pixels,
        "label_map": label_map,
        "segment_embeddings": torch.from_numpy(embeddings),
        "num_segments": torch.tensor(len(keep), dtype=torch.int64),
        "caption": raw["caption"],
        "caption_embedding": torch.from_numpy(raw["caption_embedding"].astype(np.float32)),
        "image_embedding": torch.from_numpy(raw["image_embedding"].astype(np.float32)),
        "key": raw["key"],
    }


def threaded_map(fn: Callable[[T], U], items: Iterable[T], threads: int, ahead: int | None = None) -> Iterator[U]:
    """`map(fn, items)` run in `threads` threads with one torch intra-op thread each, results in input order (so
    the output is the same as the plain map), with `ahead` items (default 2 x threads) submitted beyond the one
    taken: the threads keep working on those while the consumer is busy elsewhere. Decoding and resizing release the
    GIL, so threads scale without worker processes and their shared-memory batch copies. Closing the iterator early
    cancels what has not started and waits for what has."""
    ahead = 2 * threads if ahead is None else ahead
    if threads < 1 or ahead < 1:
        raise ValueError(f"need threads >= 1 and ahead >= 1, got threads={threads}, ahead={ahead}")
    pending: collections.deque[Future] = collections.deque()
    with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,),
                            thread_name_prefix="spatext-decode") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def to_model_input(
    pixel_values: torch.Tensor, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Pixels as the model takes them: x / 127.5 - 1 in [-1, 1], on `device`, of `dtype`.

    uint8 pixels (`ShardDataset(..., uint8=True)`) cross to the device as uint8 and are converted there in float32,
    then cast: the same numbers as the dataset's float path. They may lie channels-last (as the loader yields them);
    the result is always in standard (planar) memory. Float pixels (already in [-1, 1]) are moved and cast.
    """
    if pixel_values.dtype == torch.uint8:  # channels-last from the loader: made planar in the float conversion
        pixels = pixel_values.to(device, non_blocking=True).to(torch.float32, memory_format=torch.contiguous_format)
        return pixels.div_(127.5).sub_(1.0).to(dtype)
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be uint8 (0..255) or float ([-1, 1]), got {pixel_values.dtype}")
    return pixel_values.to(device, dtype, non_blocking=True)


def _dist_defaults(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """rank / world_size, defaulting to torch.distributed's when it is initialised, else 0 / 1."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


class ShardDataset(torch.utils.data.IterableDataset):
    """Training samples streamed from spatext shards; see the module docstring for the split and the crop.

    Yields dicts: pixel_values (3 x R x R float32 in [-1, 1]; uint8 0..255 in channels-last memory with
    `uint8=True`, for `to_model_input`), label_map (R x R int64, 0 = none, 1..k; uint8 with `uint8=True`),
    segment_embeddings (max_segments x D float32, row i-1 = segment i, zeros beyond k), num_segments (int64
    scalar), caption (str), caption_embedding (D), image_embedding (D), key (str).

    Construct it after `torch.distributed.init_process_group` (or pass rank / world_size). Every rank must use the
    same data, seed, epoch and world size; `set_epoch` does not reach persistent DataLoader workers.
    """

    def __init__(
        self, data: str | list[str], resolution: int, *, shuffle_buffer: int = 256, seed: int = 0, epoch: int = 0,
        resample_segments: bool = False, max_segments: int = 8, rank: int | None = None,
        world_size: int | None = None, storage_options: dict | None = None, uint8: bool = False,
        decode_threads: int = 1, decode_ahead: int = 64,
    ) -> None:
        super().__init__()
        if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
            raise ValueError(f"resolution must be an int >= 1, got {resolution!r}")
        if decode_threads < 1 or decode_ahead < 1:
            raise ValueError(f"decode_threads and decode_ahead must be >= 1, got {decode_threads}, {decode_ahead}")
        if max_segments < 1:
            raise ValueError(f"max_segments must be >= 1, got {max_segments}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.resolution, self.shuffle_buffer, self.seed, self.epoch = resolution, shuffle_buffer, seed, epoch
        self.resample_segments, self.max_segments, self.uint8 = resample_segments, max_segments, bool(uint8)
        self.decode_threads, self.decode_ahead = decode_threads, decode_ahead
        self.rank, self.world_size = _dist_defaults(rank, world_size)
        self.storage_options = dict(storage_options or {})
        self.files = resolve_files(data, self.storage_options)
        footers = read_footers(self.files, self.storage_options)
        self._metadata = self._check_metadata(data, [meta for _, meta in footers])
        self.units = [
            WorkUnit(path, i, 0, n) for path, (rows, _) in zip(self.files, footers, strict=True)
            for i, n in enumerate(rows) if n > 0
        ]
        logger.info("ShardDataset: %d files, %d row groups, %d rows, resolution %d, rank %d/%d, clip %s (%s)",
                    len(self.files), len(self.units), self.num_rows, resolution, self.rank, self.world_size,
                    self._metadata.get("clip_model"), self._metadata.get("clip_pretrained"))

    def _check_metadata(self, data: object, metas: list[dict[str, str]]) -> dict[str, str]:
        """The shared metadata; also checks max_segments against the shards' k_max."""
        meta = check_metadata(data, metas)
        k_max = meta.get("k_max")
        if not self.resample_segments and k_max is not None and int(k_max) > self.max_segments:
            raise ValueError(f"max_segments={self.max_segments} is below the shards' k_max={k_max}; "
                             "raise max_segments or pass resample_segments=True")
        return meta

    @property
    def embed_dim(self) -> int:
        """CLIP embedding size D, from the shards' metadata."""
        return int(self._metadata["embed_dim"])

    @property
    def metadata(self) -> dict[str, str]:
        """The shards' key-value metadata (clip_model, clip_pretrained, segmenter, ...), for lineage."""
        return dict(self._metadata)

    @property
    def num_rows(self) -> int:
        """Rows over all shards (all ranks together)."""
        return sum(u.num_rows for u in self.units)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for `epoch` (call on every rank before iterating)."""
        self.epoch = epoch

    def my_units(self, worker: int = 0, num_workers: int = 1) -> list[WorkUnit]:
        """The units this rank's `worker` reads in the current epoch."""
        return assign_units(
            self.units, seed=self.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size,
            worker=worker, num_workers=num_workers, shuffle=self.shuffle_buffer > 0,
        )

    def _raw_rows(self, units: list[WorkUnit]) -> Iterator[dict]:
        """Raw rows of the units, in order."""
        for unit in units:
            yield from table_rows(read_unit(unit, self.storage_options))

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        units = self.my_units(worker, num_workers)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        rows = shuffle_buffer_iter(self._raw_rows(units), self.shuffle_buffer, rng)
        if self.decode_threads == 1:
            yield from map(self._sample, rows)
        else:
            yield from threaded_map(self._sample, rows, self.decode_threads, self.decode_ahead)

    def _sample(self, raw: dict) -> dict:
        """One raw row -> its training sample (a function of the row, the seed and the epoch only: any thread)."""
        resample_rng = None
        if self.resample_segments:
            resample_rng = np.random.default_rng([self.seed, self.epoch, key_hash(raw["key"])])
        return to_sample(raw, self.resolution, self.max_segments, resample_rng, self.uint8)


def _hwc(value: torch.Tensor) -> bool:
    """Whether a 3-d tensor lies in channels-last memory and not also in standard memory."""
    return value.ndim == 3 and not value.is_contiguous() and value.permute(1, 2, 0).is_contiguous()


def _stack(values: list[torch.Tensor]) -> torch.Tensor:
    """Stack CPU tensors: in a DataLoader worker torch's collate (it allocates in shared memory, so the batch
    reaches the main process without another copy); in the main process a single-threaded numpy copy (torch's
    multi-threaded stack was 10x slower on a busy 2-core machine, measured). Channels-last 3 x H x W samples are
    stacked as H x W x 3 buffers into an N x 3 x H x W batch in channels-last memory: a plain copy, no transpose."""
    hwc = all(_hwc(v) for v in values)
    if hwc:
        values = [v.permute(1, 2, 0) for v in values]
    if torch.utils.data.get_worker_info() is not None:
        out = torch.utils.data.default_collate(values)
    else:
        out = torch.from_numpy(np.stack([v.numpy() for v in values]))
    return out.permute(0, 3, 1, 2) if hwc else out


def collate(batch: list[dict]) -> dict:
    """Stack a list of samples: tensors are stacked, strings ("caption", "key") become lists."""
    if not batch:
        raise ValueError("batch is empty")
    out = {}
    for name, value in batch[0].items():
        values = [sample[name] for sample in batch]
        out[name] = _stack(values) if isinstance(value, torch.Tensor) else values
    return out
