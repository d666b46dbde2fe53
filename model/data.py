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
   shorter side) resized to R x R, bilinear (antialiased, PIL's filter) for the image and nearest for the map
   (reduced instead by ST's rule, `downsample_label_map`, where nearest sampling would step over a segment of one
   output pixel's worth of area or more: `crops.keep_small_segments`).
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
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch
from PIL.Image import DecompressionBombError

from spatext.model.crops import (
    choose_segments,
    crop_box,
    load_image_crop,
    load_label_crop,
    renumber,
)
from spatext.model.shard_files import (
    WorkUnit,
    assign_units,
    check_metadata,
    read_footers,
    read_unit,
    resolve_files,
    table_rows,
)
from spatext.pipeline.keys import key_hash

logger = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")


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


def to_sample(
    raw: dict, resolution: int, max_segments: int, resample_rng: np.random.Generator | None, uint8: bool = False,
    max_side: int | None = None,
) -> dict:
    """One raw shard row -> the training sample dict (see ShardDataset); `max_side`: the shards' image_size."""
    stored = raw["segment_index"]
    small, size = load_label_crop(raw["segment_map"], resolution, stored, max_side)
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
        self.skip_rows: tuple[int, ...] = ()  # rows each worker leaves out of the next iteration: skip_batches
        self.rank, self.world_size = _dist_defaults(rank, world_size)
        self.storage_options = dict(storage_options or {})
        self.files = resolve_files(data, self.storage_options)
        footers = read_footers(self.files, self.storage_options)
        self._metadata = self._check_metadata(data, [meta for _, meta in footers])
        sides = [int(meta["image_size"]) for _, meta in footers if meta.get("image_size")]  # builds may differ
        self._max_side = max(sides) if len(sides) == len(footers) else None
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
            raise ValueError(f"max_segments={self.max_segments} (spatext train: --max-segments) is below the "
                             f"shards' k_max={k_max}; raise it, or pass resample_segments=True (--resample-segments)")
        return meta

    @property
    def max_side(self) -> int | None:
        """The longest side a stored image or map may have: the largest image_size of the shards' builds (None where
        a shard does not record one)."""
        return self._max_side

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
        """Reshuffle for `epoch` (call on every rank before iterating); clears `skip_batches`."""
        self.epoch = epoch
        self.skip_rows: tuple[int, ...] = ()

    def skip_batches(self, batches: int, batch_size: int, num_workers: int = 0) -> int:
        """Leave out of this epoch's next iteration, without decoding their rows, the first of the `batches` batches a
        DataLoader (`batch_size`, `num_workers`, no drop_last) would yield (a mid-epoch resume); returns how many it
        leaves out. Rows still pass through the shuffle buffer, so what follows is exactly what the full iteration
        yields after them. Workers yield batches round-robin, each until its rows run out (torch's order), and every
        iteration starts at worker 0: so whole rounds are left out, and the caller drops the rest (fewer than
        `num_workers` batches) from the loader."""
        if batches < 0 or batch_size < 1 or num_workers < 0:
            raise ValueError(f"need batches >= 0, batch_size >= 1, num_workers >= 0; got {batches}, {batch_size}, "
                             f"{num_workers}")
        workers = max(1, num_workers)
        rows = [sum(u.num_rows for u in self.my_units(w, workers)) for w in range(workers)]
        counts = [math.ceil(n / batch_size) for n in rows]
        skipped, taken, round_ = [0] * workers, 0, 0
        while round_ < max(counts, default=0):
            active = [w for w in range(workers) if round_ < counts[w]]
            if taken + len(active) > batches:
                break
            for w in active:
                skipped[w] += 1
            taken, round_ = taken + len(active), round_ + 1
        self.skip_rows = tuple(min(k * batch_size, n) for k, n in zip(skipped, rows, strict=True)) if taken else ()
        return taken

    def my_units(self, worker: int = 0, num_workers: int = 1) -> list[WorkUnit]:
        """The units this rank's `worker` reads in the current epoch."""
        return assign_units(
            self.units, seed=self.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size,
            worker=worker, num_workers=num_workers, shuffle=self.shuffle_buffer > 0,
        )

    def _raw_rows(self, units: list[WorkUnit]) -> Iterator[dict]:
        """Raw rows of the units, in order."""
        for unit in units:
            for row in table_rows(read_unit(unit, self.storage_options)):
                row["_from"] = unit  # named by a decoding error
                yield row

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        units = self.my_units(worker, num_workers)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        rows = shuffle_buffer_iter(self._raw_rows(units), self.shuffle_buffer, rng)
        if self.skip_rows and len(self.skip_rows) != num_workers:
            raise ValueError(f"skip_batches was set for {len(self.skip_rows)} worker(s), the loader has {num_workers}")
        skip = self.skip_rows[worker] if self.skip_rows else 0
        rows = itertools.islice(rows, skip, None)  # read and shuffled, not decoded
        if self.decode_threads == 1:
            yield from map(self._sample, rows)
        else:
            yield from threaded_map(self._sample, rows, self.decode_threads, self.decode_ahead)

    def _sample(self, raw: dict) -> dict:
        """One raw row -> its training sample (a function of the row, the seed and the epoch only: any thread)."""
        resample_rng = None
        if self.resample_segments:
            resample_rng = np.random.default_rng([self.seed, self.epoch, key_hash(raw["key"])])
        try:
            return to_sample(raw, self.resolution, self.max_segments, resample_rng, self.uint8, self.max_side)
        # PIL, torchvision's decoder, a map of another size, an image over PIL's pixel limit
        except (OSError, ValueError, RuntimeError, DecompressionBombError) as exc:
            unit = raw.get("_from")
            where = f"{unit.path}, row group {unit.row_group}, " if unit is not None else ""
            raise ValueError(f"{where}key {raw['key']!r}: cannot use this row ({exc})") from exc


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
