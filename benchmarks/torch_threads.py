"""Build wall time by torch intra-op threads per worker process (``--torch-threads``), interleaved, in one run.

Builds the demo corpus with DirectRunner worker processes (``--direct_num_workers W --direct_running_mode
multi_processing``, tiny random CLIP at 224 px, ground-truth segments, images stored at 512 px) once per thread
setting and repeat, rotating the settings' order from one repeat to the next (with two settings: alternating which
goes first) so that machine noise and warm-up hit them alike: ``auto`` (the default: one
thread per worker process when several run) against explicit counts (``--torch-threads N``; N = the cores is torch's
own default, what every worker used before). Reports the median wall time of each and its ratio to ``auto`` (a ratio
above 1: slower than auto), prints a table and writes ``torch_threads.json``::

    python benchmarks/torch_threads.py --num-samples 256 --workers 2 --threads auto 2 --repeats 3 --out bench_output
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable

from bench_record import write_record
from bench_stats import rotated
from spatext.pipeline import build
from spatext.pipeline.demo_corpus import write_corpus


def build_seconds(corpus: str, out: str, workers: int, threads: str) -> float:
    """Wall seconds of one build of `corpus` with `workers` worker processes and `--torch-threads` from `threads`."""
    started = time.perf_counter()
    build.run([
        "--input", os.path.join(corpus, "shard-*.tar"), "--output", out, "--overwrite",
        "--clip-model", "spatext-tiny-224", "--clip-pretrained", "none", "--image-size", "512",
        "--torch-threads", "0" if threads == "auto" else threads,
        f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing",
    ])
    return time.perf_counter() - started


def time_settings(timed: Callable[[str], float], settings: list[str], repeats: int) -> dict[str, list[float]]:
    """Seconds of ``timed(setting)`` for every setting over `repeats` repeats, the order rotated each repeat (repeat r
    starts with setting r mod their number), so that no setting always runs first."""
    runs: dict[str, list[float]] = {t: [] for t in settings}
    for repeat in range(repeats):
        for setting in rotated(settings, repeat):
            runs[setting].append(timed(setting))
    return runs


def run(args: argparse.Namespace) -> dict:
    """Write (or reuse) the corpus, then time every thread setting, interleaved; returns the record."""
    corpus = os.path.join(args.out, f"threads-corpus-{args.num_samples}")
    if not os.path.exists(os.path.join(corpus, "corpus.json")):
        write_corpus(corpus, args.num_samples, seed=0, fmt="webdataset")
    output = os.path.join(args.out, "threads-build")
    build_seconds(corpus, output, args.workers, args.threads[0])  # warm-up
    runs = time_settings(lambda threads: build_seconds(corpus, output, args.workers, threads), args.threads,
                         args.repeats)
    medians = {t: statistics.median(r) for t, r in runs.items()}
    base = medians.get("auto", medians[args.threads[0]])
    return {
        "benchmark": "torch_threads", "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "samples": args.num_samples, "worker_processes": args.workers, "repeats": args.repeats,
        "clip_model": "spatext-tiny-224", "pretrained": "none (random init)", "segmenter": "annotations",
        "rows": [{"torch_threads": t, "median_s": round(medians[t], 2), "vs_auto": round(medians[t] / base, 3),
                  "samples_per_s": round(args.num_samples / medians[t], 1), "runs_s": [round(x, 2) for x in runs[t]]}
                 for t in args.threads],
        "note": "wall time of whole builds (launch, read, decode, select, CLIP embed, write) with W DirectRunner "
                "worker processes; auto = one torch thread per worker process when several run; N = "
                "--torch-threads N in every worker (N = cores: torch's default); medians of repeats after a warm-up "
                "build, the settings' order rotated each repeat",
    }


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=256, help="demo corpus size (tars of 16 samples)")
    parser.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes")
    parser.add_argument("--threads", nargs="+", default=["auto", str(os.cpu_count() or 1)],
                        help="settings to compare: auto and/or thread counts (default: auto and the cores)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="repeats, the settings' order rotated each time (median reported)")
    parser.add_argument("--out", default="bench_output", help="folder for corpus, builds and torch_threads.json")
    args = parser.parse_args(argv)
    if args.num_samples < 16 or args.workers < 1 or args.repeats < 1:
        parser.error("need --num-samples >= 16, --workers >= 1 and --repeats >= 1")
    if any(t != "auto" and not (t.isdigit() and int(t) >= 1) for t in args.threads):
        parser.error(f"--threads takes auto or whole numbers >= 1, got {' '.join(args.threads)}")
    if len(set(args.threads)) != len(args.threads):
        parser.error(f"--threads: each setting once, got {' '.join(args.threads)}")
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    record = run(args)
    print(f"torch threads per worker: {record['samples']} samples, {record['worker_processes']} worker processes, "
          f"{record['cores']} cores, tiny random CLIP (224 px), ground-truth segments")
    print(f"  {'--torch-threads':<16} {'median s':>9} {'x auto':>7} {'samples/s':>10}  runs")
    for row in record["rows"]:
        print(f"  {row['torch_threads']:<16} {row['median_s']:>9} {row['vs_auto']:>7.2f} {row['samples_per_s']:>10}  "
              f"{row['runs_s']}")
    write_record(args.out, "torch_threads.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
