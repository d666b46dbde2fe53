"""Build throughput on the CPU: samples/s of the whole job on the demo corpus, and where the time goes.

In one run: the build (DirectRunner, in-process) with its Beam metrics — CLIP forward time vs crop/transform time vs
everything else (read, decode, select, Parquet) — and the bare CLIP forward on the same number of images outside the
pipeline (the ceiling). Prints a table and writes JSON.

    python benchmarks/pipeline_cpu.py --num-samples 128 --out bench_output
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time

import torch
from apache_beam.metrics.metric import MetricsFilter

from spatext.pipeline import build
from spatext.pipeline.clip import ClipSpec, embed_texts, encode_pixels, load_clip
from spatext.pipeline.config import BuildConfig
from spatext.pipeline.demo_corpus import write_corpus


def _distribution_sum(result, namespace: str, name: str) -> float:
    """Sum of a committed Beam distribution (0 when absent)."""
    found = result.metrics().query(MetricsFilter().with_namespace(namespace).with_name(name))["distributions"]
    return float(sum(d.committed.sum for d in found if d.committed is not None))


def _counter(result, namespace: str, name: str) -> int:
    found = result.metrics().query(MetricsFilter().with_namespace(namespace).with_name(name))["counters"]
    return int(sum(c.committed for c in found))


def bare_forward_s(clip_model: str, images: int, captions: int, batch: int) -> float:
    """Seconds for the CLIP towers alone: `images` preprocessed inputs and `captions` texts, in batches of `batch`."""
    clip = load_clip(ClipSpec(model=clip_model, pretrained="none"))
    size = clip.preprocess.transforms[0].size
    size = size if isinstance(size, int) else size[0]
    pixels = torch.randn(batch, 3, size, size)
    texts = ["a small striped red star and a large blue circle above green grass under a clear sky"] * batch
    encode_pixels(clip, pixels[:2])  # warm-up
    started = time.perf_counter()
    for start in range(0, images, batch):
        encode_pixels(clip, pixels[: min(batch, images - start)])
    for start in range(0, captions, batch):
        embed_texts(clip, texts[: min(batch, captions - start)])
    return time.perf_counter() - started


def run(args: argparse.Namespace) -> dict:
    """Generate the corpus, run the build, measure the ceiling; returns the JSON record."""
    corpus = os.path.join(args.out, f"corpus-{args.num_samples}")
    if not os.path.exists(os.path.join(corpus, "corpus.json")):
        write_corpus(corpus, args.num_samples, seed=0, fmt="webdataset")
    config = BuildConfig(
        input=os.path.join(corpus, "shard-*.tar"), output=os.path.join(args.out, "build"), overwrite=True,
        segmenter="annotations", clip_model=args.clip_model, clip_pretrained="none", image_size=args.image_size,
        clip_batch_size=args.clip_batch_size,
    )
    started = time.perf_counter()
    result, manifest = build.execute(config, [])
    wall = time.perf_counter() - started
    samples = manifest["counts"]["accepted"]
    forward = _distribution_sum(result, "spatext_embed", "forward_ms") / 1000
    preprocess = _distribution_sum(result, "spatext_embed", "preprocess_ms") / 1000
    images = _counter(result, "spatext_embed", "images_embedded")
    ceiling = bare_forward_s(args.clip_model, images, samples, batch=args.clip_batch_size * 3)
    other = wall - forward - preprocess
    cores = os.cpu_count() or 1
    return {
        "benchmark": "pipeline_cpu", "machine": platform.processor() or platform.machine(), "cores": cores,
        "torch_threads": torch.get_num_threads(), "clip_model": args.clip_model, "pretrained": "none (random init)",
        "segmenter": "annotations", "image_size": args.image_size, "samples": samples, "images_embedded": images,
        "wall_s": round(wall, 2), "samples_per_s": round(samples / wall, 2),
        "clip_forward_s": round(forward, 2), "clip_preprocess_s": round(preprocess, 2), "other_s": round(other, 2),
        "forward_share": round(forward / wall, 3), "preprocess_share": round(preprocess / wall, 3),
        "other_share": round(other / wall, 3), "bare_forward_s": round(ceiling, 2),
        "end_to_end_vs_ceiling": round(ceiling / wall, 3),
        "non_model_samples_per_s_per_core": round(samples / max(wall - forward, 1e-9) / cores, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Run and report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=128, help="demo corpus size")
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--clip-batch-size", type=int, default=16, help="samples per CLIP batch")
    parser.add_argument("--image-size", type=int, default=512, help="stored image size")
    parser.add_argument("--out", default="bench_output", help="folder for corpus, build and pipeline_cpu.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    record = run(args)
    rows = [
        ("samples", record["samples"]), ("wall time (s)", record["wall_s"]),
        ("samples/s", record["samples_per_s"]),
        ("CLIP forward (s, share)", f"{record['clip_forward_s']} ({record['forward_share']:.0%})"),
        ("CLIP crop+transform (s, share)", f"{record['clip_preprocess_s']} ({record['preprocess_share']:.0%})"),
        ("everything else (s, share)", f"{record['other_s']} ({record['other_share']:.0%})"),
        ("bare CLIP forwards, same inputs (s)", record["bare_forward_s"]),
        ("end-to-end / ceiling", record["end_to_end_vs_ceiling"]),
        ("non-model samples/s per core", record["non_model_samples_per_s_per_core"]),
    ]
    print(f"pipeline_cpu: {record['clip_model']} (random init), {record['cores']} cores, {record['image_size']} px")
    for name, value in rows:
        print(f"  {name:<36} {value}")
    path = os.path.join(args.out, "pipeline_cpu.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
