"""Mask2Former's cost of input shapes it has not run before: the build's calls vs the same calls repeated.

The build feeds the segmenter new images in every call, so nearly every pass has a (batch, height, width) the model
has not seen; benchmarks that repeat their batches time only shapes seen before. This script segments the demo
corpus's images (decoded as the build decodes them) in batches, each batch timed on its first call (fresh shapes)
and on later calls (the same shapes again), for each set-up of --setups:

  LABEL=BATCH[:one_pass][:no_cudnn][:gridN]   e.g. passes16=16  one8=8:one_pass  passes16_nocudnn=16:no_cudnn
                                              passes16_grid32=16:grid32 (passes padded to 32 px, not the default)

Each set-up gets images of its own, drawn from one corpus; a shape an earlier set-up (or the warm-up) ran is not new
to a later one, so each set-up reports its new shapes and the extra time of its first round per new shape (set-ups
on different images: compare rates within a set-up, first vs again). Prints a table, writes JSON.

With --profile (the default) it then runs one batch of a shape no set-up ran, first and again, under
``torch.profiler``, and records where the first call's extra time goes: the top operators by self CPU and by self
device time in each call, and (on cuda) the caching allocator's device allocations (cudaMalloc calls) and retries in
each. On the GPU a new shape cost 0.1-0.5 s whether cuDNN was on or off; this names the operators that take it.

    python benchmarks/segmenter_shapes.py --out $OUT              # on the GPU machine (Swin-L sized, bf16)
    python benchmarks/segmenter_shapes.py --smoke --out /tmp/shapes   # tiny model on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from pipeline_gpu import corpus_images  # the build's own decoded images

from bench_record import write_record
from spatext.pipeline.records import Sample
from spatext.pipeline.segmenters import SegmenterSpec, create_segmenter


def parse_setups(text: str) -> list[tuple[str, int, bool, bool, int | None]]:
    """``LABEL=BATCH[:one_pass][:no_cudnn][:gridN],...`` -> (label, batch, one pass, cuDNN off, grid or None) per
    set-up."""
    setups = []
    for item in text.split(","):
        label, _, rest = item.strip().partition("=")
        batch, *flags = rest.split(":")
        grids = [f for f in flags if f.startswith("grid")]
        valid = bool(label) and batch.isdigit() and int(batch) >= 1 and len(grids) <= 1
        valid = valid and not set(flags) - {"one_pass", "no_cudnn", *grids}
        valid = valid and all(g[4:].isdigit() and int(g[4:]) % 32 == 0 and int(g[4:]) > 0 for g in grids)
        if not valid:
            raise ValueError(f"set-up {item!r} is not LABEL=BATCH[:one_pass][:no_cudnn][:gridN] (N a multiple of 32)")
        setups.append((label, int(batch), "one_pass" in flags, "no_cudnn" in flags,
                       int(grids[0][4:]) if grids else None))
    return setups


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_setup(segmenter, samples: list[Sample], batch: int, one_pass: bool, no_cudnn: bool, grid: int | None,
               device: str, repeats: int, seen: set) -> dict:
    """Seconds per call of each batch of ``samples``: its first call, then ``repeats`` more; the shapes its passes
    ran: distinct ones, and new ones (not in ``seen``, the shapes earlier set-ups of this run ran; updated), and
    the extra seconds of the first round per new shape."""
    floor = segmenter.min_pass_pixels
    segmenter.min_pass_pixels = float("inf") if one_pass else floor  # an infinite floor: every batch in one pass
    torch.backends.cudnn.enabled = not no_cudnn
    segmenter.pass_grid = grid
    batches = [samples[i:i + batch] for i in range(0, len(samples), batch)]
    shapes = []
    for part in batches:
        for group in segmenter.pass_groups(part):
            inputs, _ = segmenter.preprocess([part[i] for i in group])
            shapes.append(tuple(inputs["pixel_values"].shape))
    new = set(shapes) - seen
    seen.update(shapes)
    first, again = [], []
    try:
        for round_ in range(repeats + 1):
            for part in batches:
                _sync(device)
                started = time.perf_counter()
                segmenter.segment(part)
                _sync(device)
                (again if round_ else first).append(time.perf_counter() - started)
    finally:
        segmenter.min_pass_pixels = floor
        segmenter.pass_grid = None
        torch.backends.cudnn.enabled = True
    images = len(samples)
    extra = sum(first) - sum(again) / repeats  # the first round's time over a round of the same calls again
    return {"batch": batch, "one_pass": one_pass, "cudnn": not no_cudnn, "grid": grid or "default", "images": images,
            "passes": len(shapes), "distinct_shapes": len(set(shapes)), "new_shapes": len(new),
            "extra_s_per_new_shape": round(extra / len(new), 4) if new else None,
            "first_img_s": round(images / sum(first), 2),
            "again_img_s": round(images * repeats / sum(again), 2) if again else None,
            "first_call_s_median": round(statistics.median(first), 4),
            "again_call_s_median": round(statistics.median(again), 4) if again else None}


def main(argv: list[str] | None = None) -> int:
    """Write the corpus, load the segmenter, warm it on one batch, time each set-up; print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_output/shapes", help="folder for the corpus and segmenter_shapes.json")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script itself")
    parser.add_argument("--images", type=int, default=48, help="images per set-up (each set-up gets its own)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per batch after its first")
    parser.add_argument("--json", default="segmenter_shapes.json", help="name of the JSON file written in --out")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="profile a call on a new shape and the same call again (default on)")
    parser.add_argument("--setups",
                        default="passes16_grid32=16:grid32,passes16=16,passes8_grid32=8:grid32,passes8=8,"
                        "passes16_nocudnn=16:no_cudnn",
                        help="comma-separated LABEL=BATCH[:one_pass][:no_cudnn][:gridN]")
    args = parser.parse_args(argv)
    try:
        setups = parse_setups(args.setups)
    except ValueError as exc:
        parser.error(f"--setups: {exc}")
    if args.images < 1 or args.repeats < 1:
        parser.error("--images and --repeats must be >= 1")
    from spatext.pipeline.demo_corpus import write_corpus

    device = "cpu" if args.smoke else "cuda"
    config, size = ("mask2former-tiny", 128) if args.smoke else ("mask2former-swin-large", 512)
    images = args.images * (len(setups) + 1)  # one set-up's worth more for the warm-up and the profiled batch
    corpus = os.path.join(args.out, "corpus")
    write_corpus(corpus, images, seed=1, fmt="webdataset", samples_per_shard=max(1, images // 4))
    decoded = corpus_images(corpus, images, size)
    samples = [Sample(f"k{i}", "s", "c", im) for i, im in enumerate(decoded)]
    spec = SegmenterSpec("mask2former", weights="none", config=config, threshold=0.0, mask_threshold=0.0,
                         overlap_threshold=0.0, processor_size=size, device=device,
                         precision="fp32" if args.smoke else "bf16")
    segmenter = create_segmenter(spec)
    segmenter.segment(samples[-8:])  # one-time costs (CUDA context, kernels' first load) out of every set-up
    record: dict = {"benchmark": "segmenter_shapes", "smoke": args.smoke, "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "config": config,
                    "size": size, "weights": "random",
                    "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    print(f"{'set-up':<20}{'batch':>6}{'passes':>8}{'shapes':>8}{'new':>5}{'first img/s':>13}{'again img/s':>13}"
          f"{'extra s/new':>13}")
    seen: set = set()  # shapes the model has run in this process (the warm-up's too)
    for group in segmenter.pass_groups(samples[-8:]):
        seen.add(tuple(segmenter.preprocess([samples[-8:][i] for i in group])[0]["pixel_values"].shape))
    for index, (label, batch, one_pass, no_cudnn, grid) in enumerate(setups):
        part = samples[index * args.images:(index + 1) * args.images]
        result = time_setup(segmenter, part, batch, one_pass, no_cudnn, grid, device, args.repeats, seen)
        record[label] = result
        print(f"{label:<20}{batch:>6}{result['passes']:>8}{result['distinct_shapes']:>8}{result['new_shapes']:>5}"
              f"{result['first_img_s']:>13}{result['again_img_s']:>13}{result['extra_s_per_new_shape']!s:>13}",
              flush=True)
        write_record(args.out, args.json, record)
    if args.profile:
        batch = samples[len(setups) * args.images:][:setups[0][1]]
        record["profile"] = profile_new_shape(segmenter, batch, size, seen, device)
        for call in ("first", "again"):
            result = record["profile"][call]
            print(f"profile, {call} call on shape {record['profile']['shape']}: {result['wall_s']} s, device "
                  f"allocations {result['device_allocs']}; top self CPU ms: " + ", ".join(
                      f"{op['name']} {op['self_cpu_ms']}" for op in result["top_cpu"][:6]), flush=True)
        write_record(args.out, args.json, record)
    return 0


def new_shape_batch(segmenter, samples: list[Sample], size: int, seen: set) -> tuple[list[Sample], tuple]:
    """``samples`` resized to one size (``size`` x a width beyond ``size``) whose pass shape is not in ``seen``, and
    that shape."""
    from PIL import Image

    for extra in range(1, 200):
        width = size + 8 * extra
        batch = [Sample(f"p{i}", "s", "c", np.asarray(Image.fromarray(s.image).resize((width, size))))
                 for i, s in enumerate(samples)]
        shape = tuple(segmenter.preprocess(batch)[0]["pixel_values"].shape)
        if shape not in seen:
            return batch, shape
    raise RuntimeError("no pass shape the set-ups did not run within 1,600 px of width")


def profile_new_shape(segmenter, samples: list[Sample], size: int, seen: set, device: str) -> dict:
    """One call on a batch of a new shape (one pass) under ``torch.profiler``, then the same call again: wall time,
    device allocations (cuda) and the top operators by self CPU / device time of each."""
    from torch.profiler import ProfilerActivity, profile

    floor = segmenter.min_pass_pixels
    segmenter.min_pass_pixels = float("inf")  # one pass: one new shape
    try:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with profile(activities=activities):  # the profiler's own first-use cost, out of the first profiled call
            segmenter.segment(samples)
            _sync(device)
        seen.add(tuple(segmenter.preprocess(samples)[0]["pixel_values"].shape))  # that shape is not new any more
        batch, shape = new_shape_batch(segmenter, samples, size, seen)
        out: dict = {"shape": list(shape), "images": len(batch)}
        for call in ("first", "again"):
            stats = torch.cuda.memory_stats() if device.startswith("cuda") else {}
            _sync(device)
            with profile(activities=activities) as prof:
                started = time.perf_counter()
                segmenter.segment(batch)
                _sync(device)
                wall = time.perf_counter() - started
            after = torch.cuda.memory_stats() if device.startswith("cuda") else {}
            out[call] = {"wall_s": round(wall, 4), **{
                name: after.get(key, 0) - stats.get(key, 0) if after else None
                for name, key in (("device_allocs", "num_device_alloc"), ("alloc_retries", "num_alloc_retries"))},
                **top_operators(prof.key_averages())}
    finally:
        segmenter.min_pass_pixels = floor
    return out


def top_operators(averages, count: int = 15) -> dict:
    """The ``count`` operators of a profile with the most self CPU time, and with the most self device time."""
    def row(event, field: str) -> dict:
        return {"name": event.key, "calls": event.count, field: round(getattr(event, attr[field]) / 1000, 3)}

    attr = {"self_cpu_ms": "self_cpu_time_total", "self_device_ms": "self_device_time_total"}
    by_cpu = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:count]
    by_device = sorted(averages, key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)[:count]
    return {"top_cpu": [row(e, "self_cpu_ms") for e in by_cpu],
            "top_device": [row(e, "self_device_ms") for e in by_device if getattr(e, "self_device_time_total", 0)]}


if __name__ == "__main__":
    raise SystemExit(main())
