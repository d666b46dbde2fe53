"""One model shared by N threads: calls/s with the calls free to overlap vs one at a time (the build's device lock).

A build shares one model among threads twice: DirectRunner's ``multi_threading`` workers share a process's model,
and ``--model-sharing machine`` serves every worker process from one model server, a thread per client. PyTorch
releases the GIL around every operator, so threads that run a model at once trade the GIL at every operator. A GPU
forward is such a stream of small operators (the CPU only launches kernels), and so is a small model on the CPU,
which is what this script times: the real tiny Mask2Former (``SerialSegmenter`` vs the segmenter it wraps) and the
tiny CLIP image tower (``embed_images`` under the model's ``device_lock`` or not), torch on one intra-op thread.
Over ``--repeats`` rounds each (model, threads) pair is timed both ways, alternating which goes first from one round
to the next; the table gives the medians and the min-max range of the rounds.

    python benchmarks/shared_model.py --out bench_output      # prints a table, writes shared_model.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from bench_record import write_record
from bench_stats import rotated
from spatext.pipeline.clip import ClipSpec, embed_images, load_clip
from spatext.pipeline.records import Sample
from spatext.pipeline.segment import SerialSegmenter
from spatext.pipeline.segmenters import SegmenterSpec, create_segmenter


def calls_per_second(call: Callable[[], object], threads: int, calls: int) -> float:
    """``calls`` calls of ``call`` split evenly over ``threads`` threads started together: calls per second."""
    per_thread = calls // threads
    start = threading.Barrier(threads + 1)

    def work() -> None:
        start.wait()
        for _ in range(per_thread):
            call()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    return per_thread * threads / (time.perf_counter() - started)


def models(image_size: int, batch: int) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """Per model, the (free, one-at-a-time) call of one batch."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8) for _ in range(batch)]
    samples = [Sample(f"k{i}", "s", "c", image) for i, image in enumerate(images)]
    segmenter = create_segmenter(SegmenterSpec("mask2former", weights="none", config="mask2former-tiny",
                                               processor_size=image_size, device="cpu"))
    serial = SerialSegmenter(segmenter)
    clip = load_clip(ClipSpec(model="spatext-tiny", pretrained="none", device="cpu"))

    def clip_serial():
        with clip.device_lock:
            return embed_images(clip, images)

    return {
        "mask2former-tiny": (lambda: segmenter.segment(samples), lambda: serial.segment(samples)),
        "clip spatext-tiny": (lambda: embed_images(clip, images), clip_serial),
    }


def time_rounds(calls: dict[str, tuple[Callable[[], object], Callable[[], object]]], threads: list[int],
                count: int, repeats: int, timer: Callable[[Callable[[], object], int, int], float] = calls_per_second,
                ) -> dict[tuple[str, int, str], list[float]]:
    """Calls/s of every (model, threads, mode) over `repeats` rounds; within a round the free and the one-at-a-time
    measurement of a pair alternate which goes first (free first in even rounds), so neither always runs warmer."""
    rates: dict[tuple[str, int, str], list[float]] = {}
    for repeat in range(repeats):
        for name, (free, serial) in calls.items():
            for n in threads:
                for mode, call in rotated([("free", free), ("serial", serial)], repeat):
                    rates.setdefault((name, n, mode), []).append(timer(call, n, count))
    return rates


def summary_rows(rates: dict[tuple[str, int, str], list[float]], names: list[str], threads: list[int]) -> list[dict]:
    """Per (model, threads): median and min-max range of each mode's calls/s over the rounds, and the medians'
    ratio."""
    rows = []
    for name in names:
        for n in threads:
            row: dict = {"model": name, "threads": n}
            for mode in ("free", "serial"):
                runs = rates[name, n, mode]
                row[f"{mode}_calls_s"] = round(statistics.median(runs), 2)
                row[f"{mode}_range_calls_s"] = [round(min(runs), 2), round(max(runs), 2)]
                row[f"{mode}_runs"] = [round(r, 2) for r in runs]
            row["serial_over_free"] = round(row["serial_calls_s"] / row["free_calls_s"], 3)
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    """The table: medians with their min-max ranges."""
    print("| model | threads | free calls/s (range) | one at a time calls/s (range) | one at a time / free |\n"
          "|---|---|---|---|---|")
    for row in rows:
        free, serial = row["free_range_calls_s"], row["serial_range_calls_s"]
        print(f"| {row['model']} | {row['threads']} | {row['free_calls_s']:.1f} ({free[0]:.1f}–{free[1]:.1f}) | "
              f"{row['serial_calls_s']:.1f} ({serial[0]:.1f}–{serial[1]:.1f}) | {row['serial_over_free']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    """Time every (model, threads) pair free and serial, interleaved over --repeats rounds; print, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2,4,8", help="comma-separated numbers of threads sharing the model")
    parser.add_argument("--calls", type=int, default=48, help="calls per measurement (split over the threads)")
    parser.add_argument("--batch", type=int, default=2, help="images per call")
    parser.add_argument("--image-size", type=int, default=64, help="image side (small: operator-bound, as on a GPU)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds (free and one at a time alternate which goes first); medians and "
                        "ranges are reported")
    parser.add_argument("--out", default="bench_output", help="folder for shared_model.json")
    args = parser.parse_args(argv)
    try:
        threads = [int(n) for n in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads: comma-separated integers, got {args.threads!r}")
    if min(threads) < 1 or args.calls < max(threads):
        parser.error("--threads must be >= 1 and --calls at least the largest of them")
    if any(args.calls % n for n in threads):  # every thread makes calls / n calls: the header's count is exact
        parser.error(f"--calls {args.calls} must be a multiple of every --threads value ({args.threads})")
    if min(args.repeats, args.batch, args.image_size) < 1:
        parser.error("--repeats, --batch and --image-size must be >= 1")
    intra_op = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        calls = models(args.image_size, args.batch)
        for free, serial in calls.values():  # warm-up
            free(), serial()
        rates = time_rounds(calls, threads, args.calls, args.repeats)
    finally:
        torch.set_num_threads(intra_op)
    print(f"{args.calls} calls of {args.batch} images at {args.image_size} px, torch on 1 intra-op thread, "
          f"medians (min-max) of {args.repeats} rounds, free and one at a time alternating which goes first")
    rows = summary_rows(rates, list(calls), threads)
    print_table(rows)
    record = {"benchmark": "shared_model", "args": vars(args), "rows": rows, "torch": torch.__version__,
              "machine": platform.machine(), "cpu_count": os.cpu_count()}
    with contextlib.suppress(AttributeError):
        record["cpu_affinity"] = len(os.sched_getaffinity(0))
    write_record(args.out, "shared_model.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
