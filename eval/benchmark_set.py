"""Benchmark sets: samples with a global prompt, masks, local prompts and a reference image, made from shards.

``spatext eval make-benchmark --shards DIR --protocol {all,filtered,few} --num N --seed S --out B`` writes::

    B/benchmark.json        what the set is: format + version, protocol and its rule, seed, counts, skipped counts,
                            the source shards (path, files, rows, their spatext metadata), creation time, versions
    B/samples.jsonl         one JSON object per sample, ordered by key:
                            {"key", "prompt" (the global caption), "width", "height",
                             "regions": [{"index": 1..K, "prompt": local prompt, "area": fraction of the image,
                                          "source_index": the segment's index in the shard}],
                             "masks": "masks/STEM.png", "reference": "reference/STEM.png"}
    B/masks/STEM.png        single-channel (L) index map of the image's size: 0 = unconditioned, i = region i,
                            the kept regions renumbered 1..K in their shard index order
    B/reference/STEM.png    the shard's image (lossless PNG of the decoded pixels)

STEM is the key when it is made of ``[A-Za-z0-9._-]`` only, else a sanitised key plus a hash of the key.
``benchmark.json`` is written last: a folder without it is incomplete. Read a set with ``load_benchmark(B)``
(decoded arrays) or ``read_benchmark_info(B)``. ``benchmark_fingerprint(B)`` identifies the set by what defines it
(benchmark.json without its volatile fields ``VOLATILE_FIELDS``, samples.jsonl and every mask and reference PNG), so
that generations made from a set still match it after an identical rebuild.

Local prompts are the segments' labels (the segmenter's class names, e.g. COCO's). Segments without a label cannot
be prompted and are left out (``unlabelled_regions`` counts them over all rows read; their pixels are 0 in the
masks). Protocols (DESIGN.md, as used by follow-up work), applied to the labelled segments a shard row holds:

- ``all``: every segment; ``filtered``: segments with area >= 5% of the image;
- ``few``: 1-3 of the ``filtered`` segments, K ~ U[1, 3] capped by the candidates and which ones at random, by the
  pipeline's own selection (``choose_segments``) seeded by (seed, key).

A row with no kept region is skipped (``no_region``). Which N samples: the eligible rows ranked by a hash of
(seed, key), the first N (all of them when N is not given) — the same set for the same shards and seed, whatever
the shard count or order. Note that shards hold only the segments the build selected (``--min-area``, ``--k-max``):
for a faithful ``all``, build the source with ``--min-area 0 --k-min 255 --k-max 255`` (every segment).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from spatext.eval.masks import check_index_map, region_indices
from spatext.eval.outputs import is_same_or_inside, only_files_with_suffix, read_info
from spatext.paths import inside, match_in
from spatext.pipeline.image_formats import OPEN_IMAGE_FORMATS, OPEN_MAP_FORMATS
from spatext.pipeline.parquet_files import parquet_file
from spatext.pipeline.records import Segment, Segmentation
from spatext.pipeline.schema import (
    SCHEMA_VERSION,
    ShardSample,
    decode_image,
    encode_image,
    read_metadata,
    row_to_sample,
    shard_schema,
)
from spatext.pipeline.selection import SelectOptions, choose_segments
from spatext.pipeline.write import list_parquet
from spatext.versions import package_version

logger = logging.getLogger(__name__)

FORMAT = "spatext-benchmark"
FORMAT_VERSION = 1
PROTOCOLS = ("all", "filtered", "few")
MIN_AREA = 0.05
FEW_K = (1, 3)
INFO_FILE = "benchmark.json"
SAMPLES_FILE = "samples.jsonl"
MASKS_DIR = "masks"
REFERENCE_DIR = "reference"
MAX_BENCHMARK_PIXELS = 4096 * 4096  # masks over this are refused from their header (shards store 512 px by default)
SHARD_COLUMNS = tuple(shard_schema().names)  # what a shard must hold for the benchmark's two passes
VOLATILE_FIELDS = ("created", "wall_s", "package_version")  # benchmark.json fields that differ between identical builds
FINGERPRINT_VERSION = "spatext-benchmark-fingerprint-v1"
RULES = {
    "all": "every labelled segment",
    "filtered": f"labelled segments with area >= {MIN_AREA}",
    "few": f"{FEW_K[0]}-{FEW_K[1]} labelled segments with area >= {MIN_AREA}, chosen by (seed, key)",
}


@dataclass(frozen=True)
class BenchmarkSpec:
    """What ``make_benchmark`` builds (one config object; the CLI flags map to its fields)."""

    shards: str  # a build folder (with shards/) or a folder of shard Parquet files
    out: str
    protocol: str = "filtered"
    num: int | None = None  # None = every eligible sample
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        """Reject invalid settings with the flag that sets them."""
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol {self.protocol!r} is not valid; choose one of {', '.join(PROTOCOLS)}")
        if self.num is not None and self.num < 1:
            raise ValueError(f"--num must be >= 1 (or left out for every eligible sample), got {self.num}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class BenchmarkRegion:
    """One region of a benchmark sample: its index in the masks, its local prompt and its area."""

    index: int
    prompt: str
    area: float
    source_index: int | None = None


@dataclass(frozen=True)
class BenchmarkSample:
    """A decoded benchmark sample."""

    key: str
    prompt: str  # the global prompt
    regions: tuple[BenchmarkRegion, ...]  # by index, 1..K
    masks: np.ndarray  # H x W uint8 index map
    reference: np.ndarray  # H x W x 3 uint8

    @property
    def local_prompts(self) -> list[str]:
        """The local prompts in region-index order (``local_prompts[i - 1]`` belongs to region i)."""
        return [region.prompt for region in self.regions]


def _is_kept(segment: dict, protocol: str) -> bool:
    """Whether a labelled segment passes the protocol's area rule (``few`` picks among these later)."""
    return protocol == "all" or float(segment["area"]) >= MIN_AREA


def _labelled(segments: list[dict]) -> list[dict]:
    """Segments with a non-empty label."""
    return [s for s in segments if s.get("label") and str(s["label"]).strip()]


def rank(seed: int, key: str) -> str:
    """The ordering key of a sample: a hash of (seed, key), independent of shard order."""
    return hashlib.sha256(f"{seed}\x00benchmark\x00{key}".encode()).hexdigest()


def shard_files(shards: str) -> list[str]:
    """The shard Parquet files of a build folder, or of a folder of Parquet files."""
    files = list_parquet(shards)
    if not files:
        files = sorted(m.path for m in match_in(shards, "*.parquet"))
    if not files:
        raise ValueError(f"--shards {shards!r}: no shards found (looked for shards/*.parquet and *.parquet in it)")
    return files


def _shard_file(path: str) -> pq.ParquetFile:
    """One shard opened, after a check of the columns the benchmark reads; ValueError naming the file otherwise (a
    Parquet file that is not a spatext shard, or not Parquet at all)."""
    try:
        parquet = parquet_file(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"--shards: {path!r} is not a readable Parquet file: {exc}") from exc
    names = parquet.schema_arrow.names
    missing = [c for c in SHARD_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"--shards: {path!r} is not a spatext shard (schema v{SCHEMA_VERSION}): it lacks the "
                         f"column(s) {', '.join(map(repr, missing))}; its columns: {', '.join(names) or 'none'}")
    return parquet


def _scan(files: list[str], spec: BenchmarkSpec) -> tuple[list[str], dict]:
    """Pass 1 (keys and segment lists only): the eligible keys by rank, and counts."""
    eligible, seen = [], set()
    counts = {"rows": 0, "no_region": 0, "unlabelled_regions": 0}
    for path in files:
        parquet = _shard_file(path)
        # Only the segments' index / area / label leaves: the embeddings are not needed to choose samples.
        leaves = [c.path for c in parquet.schema if c.path.startswith("segments.") and
                  c.path.rsplit(".", 1)[-1] in ("index", "area", "label")]
        table = parquet.read(columns=["key", *leaves])
        for key, segments in zip(table.column("key").to_pylist(), table.column("segments").to_pylist(), strict=True):
            if key in seen:
                raise ValueError(f"--shards: key {key!r} occurs twice (run `spatext verify` on the build)")
            seen.add(key)
            counts["rows"] += 1
            labelled = _labelled(segments)
            counts["unlabelled_regions"] += len(segments) - len(labelled)
            if any(_is_kept(s, spec.protocol) for s in labelled):
                eligible.append(key)
            else:
                counts["no_region"] += 1
    eligible.sort(key=lambda k: rank(spec.seed, k))
    return eligible, counts


def kept_segments(sample: ShardSample, protocol: str, seed: int) -> list[dict]:
    """The segments of a shard row that the protocol keeps, in shard index order."""
    candidates = [s for s in _labelled(sample.segments) if _is_kept(s, protocol)]
    if protocol != "few" or not candidates:
        return sorted(candidates, key=lambda s: s["index"])
    segmentation = Segmentation(
        id_map=sample.segment_map.astype(np.int32),
        segments=tuple(Segment(int(s["index"]), s["label"]) for s in candidates),
    )
    options = SelectOptions(min_area=MIN_AREA, k_min=FEW_K[0], k_max=FEW_K[1], seed=seed)
    chosen = set(choose_segments(segmentation, sample.key, options))
    if not chosen:
        raise ValueError(f"sample {sample.key!r}: stored areas disagree with its segment_map (run `spatext verify`)")
    return [s for s in sorted(candidates, key=lambda s: s["index"]) if int(s["index"]) in chosen]


def file_stem(key: str) -> str:
    """A safe file name stem for a key (the key itself when it is safe)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:80]
    return safe if safe == key else f"{safe or 'sample'}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _png(array: np.ndarray) -> bytes:
    """PNG bytes of an index map (mode L) or an RGB image."""
    if array.ndim == 3:
        return encode_image(array, "png")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_sample(sample: ShardSample, kept: list[dict], out: str) -> dict:
    """Write one sample's masks and reference PNGs; return its samples.jsonl record."""
    stem = file_stem(sample.key)
    masks = np.zeros(sample.segment_map.shape, dtype=np.uint8)
    regions = []
    for index, segment in enumerate(kept, start=1):
        region = sample.segment_map == int(segment["index"])
        masks[region] = index
        regions.append({"index": index, "prompt": str(segment["label"]).strip(), "area": round(float(region.mean()), 6),
                        "source_index": int(segment["index"])})
    paths = {"masks": f"{MASKS_DIR}/{stem}.png", "reference": f"{REFERENCE_DIR}/{stem}.png"}
    for name, array in (("masks", masks), ("reference", sample.image)):
        with open(os.path.join(out, paths[name]), "wb") as handle:
            handle.write(_png(array))
    height, width = masks.shape
    return {"key": sample.key, "prompt": sample.caption, "width": width, "height": height, "regions": regions, **paths}


def _check_replaceable(spec: BenchmarkSpec, existing: list[str]) -> None:
    """ValueError unless the ``existing`` entries of ``--out`` are a benchmark set's (complete or interrupted).

    ``--overwrite`` removes them, so they must be what ``make_benchmark`` writes: a spatext ``benchmark.json``, or
    (an interrupted build, without it) PNG-only masks/ and reference/ folders and a samples.jsonl file; and the
    shards being read must not lie inside them.
    """
    local_shards = "://" not in spec.shards
    for name in existing:
        if local_shards and is_same_or_inside(spec.shards, os.path.join(spec.out, name)):
            raise ValueError(f"--out {spec.out!r}: {name} holds the --shards {spec.shards!r}; refusing to replace it")
    if INFO_FILE in existing:
        try:
            read_benchmark_info(spec.out, "--out")
        except ValueError as e:  # json.JSONDecodeError included
            raise ValueError(f"--out {spec.out!r} is not a benchmark set made by spatext ({e}); refusing to "
                             f"--overwrite it") from e
        return
    for name in existing:
        path = os.path.join(spec.out, name)
        if name == SAMPLES_FILE:
            ok = os.path.isfile(path)
        else:
            ok = os.path.isdir(path) and only_files_with_suffix(path, (".png",))
        if not ok:
            raise ValueError(f"--out {spec.out!r}: {name} is not what make-benchmark writes (and there is no "
                             f"{INFO_FILE}); refusing to --overwrite it")


def _prepare_out(spec: BenchmarkSpec) -> None:
    """Create the output folders; an existing benchmark is replaced only with ``overwrite`` (and only its entries)."""
    names = (INFO_FILE, SAMPLES_FILE, MASKS_DIR, REFERENCE_DIR)
    existing = [n for n in names if os.path.lexists(os.path.join(spec.out, n))]
    if existing and not spec.overwrite:
        raise ValueError(f"--out {spec.out!r} already holds a benchmark ({', '.join(existing)}); pass --overwrite")
    _check_replaceable(spec, existing)
    for name in existing:
        path = os.path.join(spec.out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    for name in (MASKS_DIR, REFERENCE_DIR):
        os.makedirs(os.path.join(spec.out, name), exist_ok=True)


def _source_info(files: list[str], spec: BenchmarkSpec, counts: dict) -> dict:
    """The source shards' description for benchmark.json (metadata of the first shard, minus its creation time)."""
    metas = []
    for path in files:
        meta = read_metadata(parquet_file(path).schema_arrow)
        meta.pop("created", None)
        metas.append(meta)
    if spec.protocol == "all" and metas and (metas[0].get("min_area") not in ("0", "0.0") or
                                             metas[0].get("k_max") != "255"):
        logger.warning("--protocol all: the shards hold only the segments the build selected (min_area=%s, "
                       "k_max=%s); build with --min-area 0 --k-min 255 --k-max 255 to keep every segment",
                       metas[0].get("min_area"), metas[0].get("k_max"))
    shards = spec.shards if "://" in spec.shards else os.path.abspath(spec.shards)
    return {"shards": shards, "files": [os.path.basename(f) for f in files], "rows": counts["rows"],
            "metadata": metas[0] if metas else {}, "metadata_consistent": all(m == metas[0] for m in metas)}


def _iter_chosen(files: list[str], chosen: set[str]) -> Iterator[ShardSample]:
    """Pass 2: decode the chosen rows only."""
    for path in files:
        parquet = parquet_file(path)
        for group in range(parquet.num_row_groups):
            keys = parquet.read_row_group(group, columns=["key"]).column("key")
            wanted = pc.is_in(keys, value_set=pa.array(sorted(chosen), type=pa.string()))
            if pc.any(wanted).as_py():
                for row in parquet.read_row_group(group).filter(wanted).to_pylist():
                    yield row_to_sample(row)


def make_benchmark(spec: BenchmarkSpec) -> dict:
    """Write the benchmark set that ``spec`` describes; return its ``benchmark.json`` record."""
    started = time.time()
    files = shard_files(spec.shards)
    eligible, counts = _scan(files, spec)
    chosen = eligible if spec.num is None else eligible[: spec.num]
    if spec.num is not None and len(chosen) < spec.num:
        logger.warning("--num %d: only %d eligible samples under protocol %s", spec.num, len(chosen), spec.protocol)
    _prepare_out(spec)
    records = [
        _write_sample(sample, kept_segments(sample, spec.protocol, spec.seed), spec.out)
        for sample in _iter_chosen(files, set(chosen))
    ]
    records.sort(key=lambda r: r["key"])
    with open(os.path.join(spec.out, SAMPLES_FILE), "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    info = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "protocol": spec.protocol, "rule": RULES[spec.protocol],
        "min_area": MIN_AREA, "few_k": list(FEW_K), "seed": spec.seed, "num_requested": spec.num,
        "num_samples": len(records), "num_regions": sum(len(r["regions"]) for r in records),
        "eligible": len(eligible), "skipped": {k: counts[k] for k in ("no_region", "unlabelled_regions")},
        "source": _source_info(files, spec, counts),
        "files": {"samples": SAMPLES_FILE, "masks": f"{MASKS_DIR}/", "reference": f"{REFERENCE_DIR}/"},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "package_version": package_version("spatext"),
        "wall_s": round(time.time() - started, 2),
    }
    with open(os.path.join(spec.out, INFO_FILE), "w", encoding="utf-8") as handle:  # last: marks the set complete
        json.dump(info, handle, indent=2, sort_keys=True)
    logger.info("benchmark %s: %d samples, %d regions -> %s", spec.protocol, len(records), info["num_regions"],
                spec.out)
    return info


def read_benchmark_info(path: str, flag: str = "--benchmark") -> dict:
    """The ``benchmark.json`` of a benchmark folder given with ``flag`` (ValueError if missing or of another format)."""
    return read_info(path, INFO_FILE, FORMAT, FORMAT_VERSION, flag, "benchmark set")


def benchmark_fingerprint(path: str) -> str:
    """sha256 of what defines a benchmark set: benchmark.json minus ``VOLATILE_FIELDS``, samples.jsonl, the PNGs.

    Generations record it and ``score`` compares it: a set rebuilt identically (same shards, protocol, seed, num)
    keeps its fingerprint although its creation time and wall time differ; any changed sample, mask or reference
    image changes it.
    """
    info = {k: v for k, v in read_benchmark_info(path).items() if k not in VOLATILE_FIELDS}
    digest = hashlib.sha256(FINGERPRINT_VERSION.encode())
    digest.update(json.dumps(info, sort_keys=True, ensure_ascii=False).encode())
    with open(os.path.join(path, SAMPLES_FILE), "rb") as handle:
        samples = handle.read()
    digest.update(hashlib.sha256(samples).digest())
    for number, line in enumerate(samples.decode("utf-8").splitlines(), start=1):
        if line.strip():
            record = _parse_record(line, f"{os.path.join(path, SAMPLES_FILE)}:{number}")
            for name in ("masks", "reference"):
                with open(inside(path, record[name], f"{SAMPLES_FILE} {name!r}"), "rb") as handle:
                    digest.update(f"{name}:{record[name]}:".encode())
                    digest.update(hashlib.sha256(handle.read()).digest())
    return digest.hexdigest()


def _decode_sample(path: str, record: dict) -> BenchmarkSample:
    """Decode one samples.jsonl record and check its masks against its regions."""
    masks_path = inside(path, record["masks"], f"{SAMPLES_FILE} 'masks'")
    try:
        with open(masks_path, "rb") as handle, Image.open(handle, formats=OPEN_MAP_FORMATS) as image:
            if image.mode != "L":
                raise ValueError(f"{record['masks']}: masks must be a single-channel (L) PNG, got mode {image.mode}")
            if image.size[0] * image.size[1] > MAX_BENCHMARK_PIXELS:  # from the header: a small PNG can declare a lot
                raise ValueError(f"{record['masks']}: {image.size[0]}x{image.size[1]} masks, over the "
                                 f"{MAX_BENCHMARK_PIXELS} pixels a benchmark image may have")
            masks = np.array(image)
        with open(inside(path, record["reference"], f"{SAMPLES_FILE} 'reference'"), "rb") as handle:
            data = handle.read()
        with Image.open(io.BytesIO(data), formats=OPEN_IMAGE_FORMATS) as image:  # its size before its pixels
            if image.size != masks.shape[::-1]:
                raise ValueError(f"{record['reference']}: {image.size[0]}x{image.size[1]} but its masks are "
                                 f"{masks.shape[1]}x{masks.shape[0]}")
        reference = decode_image(data)
    except Image.DecompressionBombError as exc:  # Pillow's own limit, at open: no ValueError or OSError
        raise ValueError(f"{record['masks']} / {record['reference']}: {exc}") from exc
    check_index_map(masks, reference.shape[:2], name=record["masks"])
    regions = tuple(BenchmarkRegion(**region) for region in record["regions"])
    if region_indices(masks) != [r.index for r in regions] or [r.index for r in regions] != list(
        range(1, len(regions) + 1)
    ):
        raise ValueError(f"{record['masks']}: holds regions {region_indices(masks)}, samples.jsonl lists "
                         f"{[r.index for r in regions]} (expected 1..K in both)")
    return BenchmarkSample(record["key"], record["prompt"], regions, masks, reference)


def iter_benchmark(path: str) -> Iterator[BenchmarkSample]:
    """Decoded samples of a benchmark folder, in samples.jsonl order (one at a time)."""
    read_benchmark_info(path)
    files: dict[str, int] = {}  # masks and reference files -> the line naming them (each sample has its own)
    with open(os.path.join(path, SAMPLES_FILE), encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                where = f"{os.path.join(path, SAMPLES_FILE)}:{number}"
                record = _parse_record(line, where)
                for name in (record["masks"], record["reference"]):
                    real = os.path.realpath(os.path.join(path, name))  # a link inside the folder is the same file
                    if real in files:  # one small file listed thousands of times fills memory
                        raise ValueError(f"{where}: {name!r} is already named by line {files[real]}")
                    files[real] = number
                yield _decode_sample(path, record)


RECORD_FIELDS = {"key": str, "prompt": str, "masks": str, "reference": str, "regions": list}
REGION_FIELDS = {"index": int, "prompt": str, "area": (int, float)}


def _parse_record(line: str, where: str) -> dict:
    """One samples.jsonl line as a record with the fields and types ``_decode_sample`` reads; ValueError naming the
    line (``where``) and the field otherwise (a hand-edited or damaged file)."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting beyond the parser
        raise ValueError(f"{where}: not a JSON line ({type(exc).__name__}: {exc})") from exc
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    for name, kind in RECORD_FIELDS.items():
        if not isinstance(record.get(name), kind):
            raise ValueError(f"{where}: field {name!r} must be a {kind.__name__}, got {record.get(name)!r:.80}")
    for i, region in enumerate(record["regions"]):
        known = isinstance(region, dict) and set(region) <= {*REGION_FIELDS, "source_index"}
        if not known or any(not isinstance(region.get(n), k) or isinstance(region.get(n), bool)
                            for n, k in REGION_FIELDS.items()):
            raise ValueError(f"{where}: regions[{i}] must be an object with index (int), prompt (str), area "
                             f"(number) and optionally source_index, got {region!r:.120}")
    return record


def load_benchmark(path: str) -> list[BenchmarkSample]:
    """All decoded samples of a benchmark folder."""
    return list(iter_benchmark(path))
