"""Loader throughput on the CPU: ShardDataset samples/s vs bare JPEG decoding of the same images, in one run.

Builds (or reuses) a demo-corpus build with JPEG images (longest side 512, tiny random CLIP), then measures, interleaved
so that machine noise hits all of them alike: (a) bare decoding of the stored JPEG bytes with PIL (`decode_image`,
one core), and (b) the full loader — Parquet read, shuffle buffer, JPEG + PNG decode, crop/resize, renumbering,
collate — through a DataLoader at each resolution and worker count, in steady state (after a warm-up epoch; the time
to the first batch is reported apart). Prints a table and writes JSON.

    python benchmarks/loader.py --num-samples 256 --out bench_output
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time

import pyarrow.parquet as pq
import torch

from spatext.model.data import ShardDataset, collate, resolve_files
from spatext.pipeline import build
from spatext.pipeline.demo_corpus import write_corpus
from spatext.pipeline.schema import decode_image


def make_build(out: str, num_samples: int, image_size: int, rows_per_group: int) -> str:
    """The benchmark's build directory (reused when its manifest exists)."""
    corpus = os.path.join(out, f"loader-corpus-{num_samples}")
    target = os.path.join(out, f"loader-build-{num_samples}-{image_size}")
    if os.path.exists(os.path.join(target, "manifest.json")):
        return target
    if not os.path.exists(os.path.join(corpus, "corpus.json")):
        write_corpus(corpus, num_samples, seed=0, fmt="webdataset")
    build.run([
        "--input", os.path.join(corpus, "shard-*.tar"), "--output", target, "--overwrite", "--image-format", "jpeg",
        "--clip-model", "spatext-tiny", "--clip-pretrained", "none", "--image-size", str(image_size),
        "--rows-per-group", str(rows_per_group),
    ])
    return target


def bare_decode_s(images: list[bytes]) -> tuple[float, float]:
    """Wall and CPU seconds to decode every image once (PIL, to an RGB array), on this core."""
    started, cpu = time.perf_counter(), time.process_time()
    for data in images:
        decode_image(data)
    return time.perf_counter() - started, time.process_time() - cpu


def loader_rate(
    data: str, resolution: int, workers: int, batch_size: int, epochs: int
) -> tuple[float, float, int, float]:
    """Steady-state samples/s over `epochs` epochs after a warm-up epoch (persistent workers), the warm-up's
    time to its first batch (worker start-up + filling the shuffle buffer), the samples per epoch, and this
    process's CPU seconds per sample (all of the work when workers=0)."""
    dataset = ShardDataset(data, resolution, shuffle_buffer=256, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                                         persistent_workers=workers > 0)
    started = time.perf_counter()
    batches = iter(loader)
    count = len(next(batches)["key"])
    first = time.perf_counter() - started
    count += sum(len(batch["key"]) for batch in batches)
    started, cpu = time.perf_counter(), time.process_time()
    timed = sum(len(batch["key"]) for _ in range(epochs) for batch in loader)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return timed / wall, first, count, cpu / timed


def run(args: argparse.Namespace) -> dict:
    """Build or reuse the data, then time bare decoding and the loader variants, interleaved; returns the record."""
    data = make_build(args.out, args.num_samples, args.image_size, args.rows_per_group)
    files = resolve_files(data)
    images = [b for f in files for b in pq.read_table(f, columns=["image"]).column("image").to_pylist()]
    variants = [(r, w) for r in args.resolutions for w in args.workers]
    bare, bare_cpu, timed, startup, cpu = [], [], {v: [] for v in variants}, {v: [] for v in variants}, {}
    bare_decode_s(images[:8])  # warm-up
    for _ in range(args.repeats):
        wall, seconds = bare_decode_s(images * args.epochs)
        bare.append(len(images) * args.epochs / wall)
        bare_cpu.append(seconds / (len(images) * args.epochs))
        for resolution, workers in variants:
            rate, first, count, per_sample = loader_rate(data, resolution, workers, args.batch_size, args.epochs)
            if count != len(images):
                raise RuntimeError(f"loader produced {count} samples for {len(images)} rows")
            timed[(resolution, workers)].append(rate)
            startup[(resolution, workers)].append(first)
            cpu.setdefault((resolution, workers), []).append(per_sample)
    bare_rate, bare_ms = statistics.median(bare), 1000 * statistics.median(bare_cpu)
    rows = []
    for (resolution, workers), rates in timed.items():
        rate = statistics.median(rates)
        row = {"resolution": resolution, "num_workers": workers, "samples_per_s": round(rate, 1),
               "vs_bare_decode": round(rate / bare_rate, 3), "runs": [round(r, 1) for r in rates],
               "first_batch_s": round(statistics.median(startup[(resolution, workers)]), 2)}
        if workers == 0:  # CPU time is robust to other load on a shared machine
            row["cpu_ms_per_sample"] = round(1000 * statistics.median(cpu[(resolution, workers)]), 3)
            row["cpu_vs_bare_decode"] = round(bare_ms / row["cpu_ms_per_sample"], 3)
        rows.append(row)
    mean_bytes = sum(map(len, images)) / len(images)
    return {
        "benchmark": "loader", "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "samples": len(images), "stored_image_size": args.image_size,
        "image_format": "jpeg", "mean_image_kib": round(mean_bytes / 1024, 1), "files": len(files),
        "rows_per_group": args.rows_per_group, "batch_size": args.batch_size, "repeats": args.repeats,
        "epochs_timed": args.epochs,
        "bare_decode_samples_per_s": round(bare_rate, 1), "bare_runs": [round(r, 1) for r in bare],
        "bare_cpu_ms_per_sample": round(bare_ms, 3), "loader": rows,
        "note": "bare = PIL decode of the stored JPEG bytes to RGB arrays on one core; loader = ShardDataset + "
                "DataLoader + collate, steady state (persistent workers, after a warm-up epoch); medians of the "
                "interleaved repeats; where the shorter side is >= 2R the loader decodes JPEGs at a reduced DCT "
                "scale (PIL draft), which bare decoding does not",
    }


def main(argv: list[str] | None = None) -> int:
    """Run and report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=256, help="demo corpus size")
    parser.add_argument("--image-size", type=int, default=512, help="stored image size (longest side)")
    parser.add_argument("--rows-per-group", type=int, default=32, help="Parquet row-group size of the build")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512], help="loader output sizes")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=32, help="DataLoader batch size")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (median reported)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per loader measurement")
    parser.add_argument("--out", default="bench_output", help="folder for corpus, build and loader.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    record = run(args)
    print(f"loader: {record['samples']} samples, JPEG stored at <= {record['stored_image_size']} px "
          f"(mean {record['mean_image_kib']} KiB), {record['cores']} cores")
    print(f"  {'':<34} {'samples/s':>9} {'x bare':>7} {'first batch':>12} {'CPU ms/sample':>14} {'CPU x bare':>11}")
    print(f"  {'bare JPEG decode (1 core)':<34} {record['bare_decode_samples_per_s']:>9} {1:>7.2f} {'':>12} "
          f"{record['bare_cpu_ms_per_sample']:>14} {1:>11.2f}")
    for row in record["loader"]:
        name = f"ShardDataset R={row['resolution']}, workers={row['num_workers']}"
        cpu = (f"{row['cpu_ms_per_sample']:>14} {row['cpu_vs_bare_decode']:>11.2f}" if "cpu_ms_per_sample" in row
               else f"{'':>14} {'':>11}")
        print(f"  {name:<34} {row['samples_per_s']:>9} {row['vs_bare_decode']:>7.2f} {row['first_batch_s']:>10} s "
              f"{cpu}")
    path = os.path.join(args.out, "loader.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
