"""Built-in procedural image-text corpus with exact COCO-panoptic ground truth (demo, tests, benchmark world).

``generate_sample(index, seed)`` makes one sample (see ``demo_corpus_sample``); ``write_corpus`` writes many as
webdataset shards or as a folder, byte-identical for the same seed::

    python -m spatext.pipeline.demo_corpus OUT_DIR --num-samples 64 --seed 0 --format webdataset

webdataset: ``shard-00000.tar`` ... with members ``KEY.jpg``, ``KEY.txt``, ``KEY.json``, ``KEY.panoptic.png``.
folder: ``images/KEY.jpg``, ``panoptic/KEY.png``, ``panoptic/KEY.json`` and ``captions.jsonl``.
Both: ``corpus.json`` (generator, seed, num_samples, format, categories, files). The ground-truth JSON is
``{"key", "caption", "width", "height", "segments_info"}``; the PNG is ``panoptic.encode_id_map`` of the id map.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import os
import sys
import tarfile
import time
from collections.abc import Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from spatext.pipeline.demo_corpus_sample import (
    CATEGORIES,
    MAX_SIDE,
    STUFF_CATEGORIES,
    THING_CATEGORIES,
    CorpusSample,
    generate_sample,
)
from spatext.pipeline.panoptic import encode_id_map

logger = logging.getLogger(__name__)

GENERATOR = "spatext demo-corpus"
FORMATS = ("webdataset", "folder")
JPEG_QUALITY = 92
MANIFEST = "corpus.json"
CAPTIONS_FILE = "captions.jsonl"

__all__ = ["CATEGORIES", "FORMATS", "STUFF_CATEGORIES", "THING_CATEGORIES", "CorpusSample", "build_parser",
           "encode_jpeg", "generate_sample", "ground_truth", "main", "write_corpus"]


def encode_jpeg(image: np.ndarray) -> bytes:
    """JPEG bytes (quality 92, no chroma subsampling so that colour edges stay on the mask) of an RGB image."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(
        buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0
    )
    return buf.getvalue()


def ground_truth(sample: CorpusSample) -> dict:
    """The ground-truth JSON object stored beside a sample's image."""
    h, w = sample.id_map.shape
    return {"key": sample.key, "caption": sample.caption, "width": w, "height": h, "segments_info": sample.segments}


def _json_bytes(obj: object) -> bytes:
    """Compact, deterministic UTF-8 JSON."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _write_atomic(path: str, data: bytes) -> None:
    """Write a file through a temporary name, so readers never see half of it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a regular file with fixed metadata (mtime 0, root-owned, 0644) so shards are byte-reproducible."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: str, samples: list[CorpusSample]) -> None:
    """One webdataset tar: per sample KEY.jpg, KEY.txt, KEY.json, KEY.panoptic.png, in that order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            _add_member(tar, f"{s.key}.jpg", encode_jpeg(s.image))
            _add_member(tar, f"{s.key}.txt", s.caption.encode("utf-8"))
            _add_member(tar, f"{s.key}.json", _json_bytes(ground_truth(s)))
            _add_member(tar, f"{s.key}.panoptic.png", encode_id_map(s.id_map))
    _write_atomic(path, buf.getvalue())


def _write_webdataset(out_dir: str, samples: Iterator[CorpusSample], samples_per_shard: int) -> list[str]:
    """Write shard-00000.tar, shard-00001.tar, ... with ``samples_per_shard`` samples each; returns their names."""
    files, batch = [], []
    for sample in samples:
        batch.append(sample)
        if len(batch) == samples_per_shard:
            files.append(f"shard-{len(files):05d}.tar")
            _write_shard(os.path.join(out_dir, files[-1]), batch)
            batch = []
    if batch:
        files.append(f"shard-{len(files):05d}.tar")
        _write_shard(os.path.join(out_dir, files[-1]), batch)
    return files


def _write_folder(out_dir: str, samples: Iterator[CorpusSample]) -> list[str]:
    """Write images/KEY.jpg, panoptic/KEY.png, panoptic/KEY.json and captions.jsonl; returns the file names."""
    files, lines = [], []
    for s in samples:
        image, png, gt = f"images/{s.key}.jpg", f"panoptic/{s.key}.png", f"panoptic/{s.key}.json"
        _write_atomic(os.path.join(out_dir, image), encode_jpeg(s.image))
        _write_atomic(os.path.join(out_dir, png), encode_id_map(s.id_map))
        _write_atomic(os.path.join(out_dir, gt), _json_bytes(ground_truth(s)))
        lines.append(_json_bytes({"key": s.key, "image": image, "caption": s.caption}) + b"\n")
        files += [image, png, gt]
    _write_atomic(os.path.join(out_dir, CAPTIONS_FILE), b"".join(lines))
    return [CAPTIONS_FILE] + files


def _remove_stale(out_dir: str, files: list[str]) -> None:
    """Delete files that an earlier demo corpus in ``out_dir`` listed and this one did not write."""
    path = os.path.join(out_dir, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        return
    if not isinstance(old, dict) or old.get("generator") != GENERATOR:
        return
    keep = set(files)
    for name in old.get("files", []):
        if isinstance(name, str) and name not in keep and not os.path.isabs(name) and ".." not in name.split("/"):
            stale = os.path.join(out_dir, name)
            if os.path.isfile(stale):
                logger.info("removing %s (left by an earlier demo corpus in %s)", name, out_dir)
                os.remove(stale)


def _samples(num_samples: int, seed: int, stats: dict, min_side: int = 0) -> Iterator[CorpusSample]:
    """Generate ``num_samples`` samples with a progress bar (on a terminal), counting segments in ``stats``: samples
    0..num_samples-1, or with ``min_side`` the first ones (by index) whose longest side is at least that."""
    drawn = (generate_sample(index, seed) for index in itertools.count())
    chosen = itertools.islice((s for s in drawn if max(s.image.shape[:2]) >= min_side), num_samples)
    for sample in tqdm(chosen, total=num_samples, desc="demo-corpus", unit="sample", disable=not sys.stderr.isatty()):
        things = sum(1 for s in sample.segments if s["isthing"])
        stats["num_things"] += things
        stats["num_stuff"] += len(sample.segments) - things
        yield sample


def write_corpus(
    out_dir: str, num_samples: int, seed: int, fmt: str = "webdataset", samples_per_shard: int = 16,
    min_side: int = 0,
) -> dict:
    """Write ``num_samples`` samples (seed ``seed``) to ``out_dir`` as ``fmt``; returns a summary (counts, files).
    ``min_side`` keeps only samples whose longest side is at least that many pixels (benchmarks at a full stored
    size: the build never upsamples, and the demo images' sides run from 256 to 640 px)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {list(FORMATS)}, got {fmt!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0 <= min_side <= MAX_SIDE:
        raise ValueError(f"min_side must be between 0 and {MAX_SIDE} (the demo images' largest side), got {min_side}")
    logger.info("demo corpus: out_dir=%s num_samples=%d seed=%d format=%s samples_per_shard=%d",
                out_dir, num_samples, seed, fmt, samples_per_shard)
    os.makedirs(out_dir, exist_ok=True)
    stats = {"num_things": 0, "num_stuff": 0}
    samples = _samples(num_samples, seed, stats, min_side)
    if fmt == "webdataset":
        files = _write_webdataset(out_dir, samples, samples_per_shard)
    else:
        files = _write_folder(out_dir, samples)
    _remove_stale(out_dir, files)
    manifest = {"generator": GENERATOR, "seed": seed, "num_samples": num_samples, "format": fmt,
                "categories": sorted(CATEGORIES), "files": files, **({"min_side": min_side} if min_side else {})}
    _write_atomic(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1).encode("utf-8") + b"\n")
    summary = {"out_dir": out_dir, "format": fmt, "seed": seed, "num_samples": num_samples,
               "num_segments": stats["num_things"] + stats["num_stuff"], **stats,
               "num_shards": len(files) if fmt == "webdataset" else 0, "manifest": MANIFEST, "files": files}
    logger.info("demo corpus: wrote %d samples (%d things, %d stuff segments) in %d files to %s",
                num_samples, stats["num_things"], stats["num_stuff"], len(files), out_dir)
    return summary


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``spatext demo-corpus``."""
    parser = argparse.ArgumentParser(
        prog="spatext demo-corpus",
        description="Write the built-in procedural image-text corpus with exact panoptic ground truth.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output directory (created if missing)")
    parser.add_argument("--num-samples", type=int, default=64, help="number of samples to generate (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed; same seed, same bytes (default: 0)")
    parser.add_argument("--format", choices=FORMATS, default="webdataset",
                        help="webdataset tar shards or a folder with captions.jsonl (default: webdataset)")
    parser.add_argument("--samples-per-shard", type=int, default=16,
                        help="samples per webdataset shard (default: 16)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: write the corpus and print a one-line summary."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        summary = write_corpus(args.out_dir, args.num_samples, args.seed, args.format, args.samples_per_shard)
    except ValueError as err:
        parser.error(str(err))
    print(f"demo-corpus: {summary['num_samples']} samples ({summary['num_things']} objects, "
          f"{summary['num_stuff']} stuff segments) as {summary['format']} in {len(summary['files'])} files "
          f"under {summary['out_dir']} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
