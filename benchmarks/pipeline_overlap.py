"""Does the build keep a device busy? The real Beam job against an emulated GPU segmenter, on the CPU.

On a machine without a GPU this measures what `pipeline_gpu.py`'s build section measures on one: the end-to-end rate
of the job over the rate its segmenter allows. The segmenter is `emulated_device.EmulatedDeviceSegmenter`: the
corpus's ground truth after `--ms-per-image` ms per image asleep under one lock per model process (no CPU, GIL
released: a device that serialises its batches). Everything else is the real job: read, decode, the segmenter call
through RunInference (pickled to the shared model server with `processes:N`), select, CLIP (`spatext-tiny`, real but
small), encode, Parquet. For each set-up (`in_process`; `processes:N` worker processes sharing one model server;
`threads:N` worker threads sharing one model), a subset build (4 of the corpus's 16 tars: a quarter) and a full build
run; the images between them over the time between them is the steady-state rate (start-up cancels out), and
`vs_ceiling` = that rate x the device time per image (1.0 = the device never idles); with `--repeats`, the median run
of each set-up. The rate is a difference of two wall times, each with its own start-up noise: a `vs_ceiling` above 1
(faster than the emulated device allows) can only be that noise, so such a run is flagged unreliable
(`vs_ceiling_reliable`: false; rerun with more `--num-samples`), as is one whose full build was not slower.
Prints a table and writes JSON.

    python benchmarks/pipeline_overlap.py --num-samples 512 --ms-per-image 20 --out bench_output/overlap
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import platform
import sys
import time

import torch

from bench_record import build_mode, write_record
from corpus_subset import corpus_subset
from emulated_device import MS_PER_IMAGE_ENV
from spatext.pipeline import build
from spatext.pipeline.config import BuildConfig
from spatext.pipeline.demo_corpus import write_corpus

SEGMENTER = "emulated_device:EmulatedDeviceSegmenter"


def timed_build(config: BuildConfig, beam_args: list[str]) -> tuple[float, dict]:
    """Wall seconds and manifest of one build."""
    started = time.perf_counter()
    _, manifest = build.execute(config, beam_args)
    return time.perf_counter() - started, manifest


def measure(args: argparse.Namespace, corpus: str, mode: str, full_first: bool = False) -> dict:
    """One subset (quarter) and one full build of a set-up: the steady-state rate and its share of the emulated
    ceiling, flagged unreliable when that share is above 1 or undefined. `full_first` swaps the two builds' order
    (repeats alternate it, so that a cost of whichever build runs first does not bias the difference one way)."""
    beam_args, models = build_mode(mode)
    key = mode.replace(":", "")
    config = BuildConfig(
        input=os.path.join(corpus, "shard-*.tar"), output=os.path.join(args.out, key), overwrite=True,
        segmenter=SEGMENTER, segmenter_batch_size=args.segmenter_batch, clip_model="spatext-tiny",
        clip_pretrained="none", clip_batch_size=args.clip_batch, image_size=args.image_size, min_area=0.01,
        **models,
    )
    quarter = dataclasses.replace(config, input=corpus_subset(corpus, 0.25), output=config.output + "-quarter")
    if full_first:
        wall, manifest = timed_build(config, beam_args)
        quarter_wall, quarter_manifest = timed_build(quarter, beam_args)
    else:
        quarter_wall, quarter_manifest = timed_build(quarter, beam_args)
        wall, manifest = timed_build(config, beam_args)
    images = manifest["counts"]["read"]
    extra = images - quarter_manifest["counts"]["read"]
    marginal = extra / (wall - quarter_wall) if wall > quarter_wall else float("nan")
    vs_ceiling = marginal * args.ms_per_image / 1000
    return {
        "mode": mode, "images": images, "accepted": manifest["counts"]["accepted"], "wall_s": round(wall, 2),
        "quarter_wall_s": round(quarter_wall, 2), "quarter_images": images - extra, "img_s": round(images / wall, 1),
        "marginal_img_s": round(marginal, 1), "vs_ceiling": round(vs_ceiling, 3), "full_first": full_first,
        # above the device's own rate (or undefined) can only be noise in the difference of the two wall times
        "vs_ceiling_reliable": bool(math.isfinite(vs_ceiling) and vs_ceiling <= 1.0),
    }


def summarise(runs: list[dict]) -> dict:
    """A set-up's repeats: the run with the median steady-state rate, plus every run's share of the ceiling and
    how many of them were unreliable. Runs without a rate (NaN: the full build no slower than the subset) sort last,
    as the worst (NaN compares false both ways and would leave the order arbitrary)."""
    ordered = sorted(runs, key=lambda r: (math.isnan(r["marginal_img_s"]), r["marginal_img_s"]))
    return {**ordered[(len(ordered) - 1) // 2], "runs_vs_ceiling": [r["vs_ceiling"] for r in runs],
            "runs_unreliable": sum(not r["vs_ceiling_reliable"] for r in runs)}


def main(argv: list[str] | None = None) -> int:
    """Build the corpus, run each set-up, print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_output/overlap", help="folder for corpus, builds and JSON")
    parser.add_argument("--num-samples", type=int, default=512,
                        help="demo corpus size, in tars of max(1, N // 16) samples (a build of a quarter of them "
                        "also runs; >= 16)")
    parser.add_argument("--ms-per-image", type=float, default=20.0,
                        help="emulated device time per image (an H100 ran Mask2Former Swin-L at ~10 ms/img, bare)")
    parser.add_argument("--modes", default="in_process,processes:2",
                        help="comma-separated set-ups: in_process, processes:N[:ownserver] (N worker processes, one "
                        "shared model server; ownserver: a process of its own), threads:N (N worker threads, one "
                        "model)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="interleaved repeats of every set-up (the median run is reported, all runs listed)")
    parser.add_argument("--image-size", type=int, default=512, help="stored image size (px)")
    parser.add_argument("--segmenter-batch", type=int, default=8, help="segmenter batch size")
    parser.add_argument("--clip-batch", type=int, default=64, help="CLIP batch size")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.ms_per_image <= 0:
        parser.error("--ms-per-image must be > 0")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.num_samples < 16 or args.image_size < 32 or args.segmenter_batch < 1 or args.clip_batch < 1:
        parser.error("need --num-samples >= 16, --image-size >= 32, --segmenter-batch and --clip-batch >= 1")
    for mode in args.modes.split(","):
        try:
            _, models = build_mode(mode.strip())
        except ValueError as exc:
            parser.error(f"--modes: {exc}")
        if models["model_copies"] is not None:
            parser.error(f"--modes: {mode.strip()}: one emulated device per model server, so M copies would be M "
                         "devices against a ceiling of one; measure copies on a GPU (pipeline_gpu.py)")
    here = os.path.dirname(os.path.abspath(__file__))
    # the worker processes and the model server import emulated_device too, and read the time per image
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    os.environ[MS_PER_IMAGE_ENV] = str(args.ms_per_image)
    os.makedirs(args.out, exist_ok=True)
    corpus = os.path.join(args.out, "corpus")
    write_corpus(corpus, args.num_samples, seed=0, fmt="webdataset", samples_per_shard=max(1, args.num_samples // 16))
    warm_up = BuildConfig(input=corpus_subset(corpus, 1 / 16), output=os.path.join(args.out, "warm-up"),
                          overwrite=True, segmenter=SEGMENTER, clip_model="spatext-tiny", clip_pretrained="none",
                          image_size=args.image_size, min_area=0.01)
    build.execute(warm_up, [])  # one-time costs of this process (imports) before anything is timed
    modes = [mode.strip() for mode in args.modes.split(",")]
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for repeat in range(args.repeats):  # interleaved, so that machine noise hits every set-up alike
        for mode in modes:
            runs[mode].append(measure(args, corpus, mode, full_first=repeat % 2 == 1))
    rows = [summarise(runs[mode]) for mode in modes]
    record = {
        "benchmark": "pipeline_overlap", "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__,
        "ms_per_image": args.ms_per_image, "ceiling_img_s": round(1000 / args.ms_per_image, 1),
        "num_samples": args.num_samples, "image_size": args.image_size, "segmenter_batch": args.segmenter_batch,
        "repeats": args.repeats,
        "rows": rows,
        "note": "emulated device: ground truth after ms_per_image asleep per image under one lock per model "
                "process; marginal = (full - quarter images) / (full - quarter wall); vs_ceiling = marginal x "
                "ms_per_image / 1000; vs_ceiling_reliable false: above 1 (faster than the device allows) or "
                "undefined, i.e. noise in the difference of two wall times (rerun with more samples)",
    }
    print(f"pipeline_overlap: emulated device {args.ms_per_image} ms/image (ceiling {record['ceiling_img_s']} img/s), "
          f"{args.num_samples} images at {args.image_size} px, {record['cores']} cores")
    print(f"  {'set-up':<16} {'wall s':>8} {'img/s':>7} {'steady img/s':>13} {'vs ceiling':>11}  all runs")
    for row in rows:
        flag = "*" if row["runs_unreliable"] else " "
        print(f"  {row['mode']:<16} {row['wall_s']:>8} {row['img_s']:>7} {row['marginal_img_s']:>13} "
              f"{row['vs_ceiling']:>10}{flag}  {row['runs_vs_ceiling']}")
    unreliable = [f"{row['mode']} ({row['runs_unreliable']} of {args.repeats} runs)" for row in rows
                  if row["runs_unreliable"]]
    if unreliable:
        print(f"  * unreliable: {', '.join(unreliable)}: a steady-state rate above the device's "
              f"{record['ceiling_img_s']} img/s (or a full build no slower than the subset) is noise in the "
              "difference of two builds' wall times; rerun with more --num-samples")
    write_record(args.out, "pipeline_overlap.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
