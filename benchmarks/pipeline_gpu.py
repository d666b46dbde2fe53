"""Build throughput on a GPU: the end-to-end job vs the GPU-only ceiling of its two models, in one run.

Random weights at real sizes: Mask2Former with a Swin-L backbone (configs/mask2former-swin-large.json, 216 M params)
and CLIP ViT-L/14. Sections:
  clip       ViT-L/14 image tower on random pixels: our encode_pixels in fp32 and bf16, and bare bf16 weights (img/s)
  segmenter  Mask2Former alone on a preprocessed batch (the ceiling) and through our segmenter (+ pre/post-processing)
  build      the real Beam job (DirectRunner) on the demo corpus at 512 px, models on the GPU; its images/s and the
             ceiling for the same work (images / segmenter rate + crops / CLIP rate)
Prints a table, writes JSON. `--smoke` runs tiny models on the CPU to check the script itself.

    python benchmarks/pipeline_gpu.py --out $OUT          # on the GPU machine
    python benchmarks/pipeline_gpu.py --smoke --out /tmp/gpu_smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
import traceback

import numpy as np
import torch

from spatext.pipeline.clip import ClipSpec, encode_pixels, load_clip
from spatext.pipeline.records import Sample
from spatext.pipeline.segmenters import SegmenterSpec, create_segmenter


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rate(fn, items: int, device: str, repeats: int) -> float:
    """Items per second of `fn()` (which processes `items`), after one warm-up call."""
    fn()
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return items * repeats / (time.perf_counter() - started)


def bench_clip(args) -> dict:
    """The CLIP image tower alone, three precisions."""
    out = {}
    for precision in ("fp32", "bf16"):
        clip = load_clip(ClipSpec(model=args.clip_model, pretrained="none", device=args.device, precision=precision))
        pixels = torch.randn(args.clip_batch, 3, args.clip_size, args.clip_size, device=args.device)
        out[f"clip_{precision}_ours_img_s"] = _rate(lambda c=clip, x=pixels: encode_pixels(c, x), args.clip_batch,
                                                         args.device, args.repeats)
    if args.device.startswith("cuda"):
        model = clip.model.to(torch.bfloat16)
        pixels = pixels.to(torch.bfloat16)

        def forward():
            with torch.inference_mode():
                model.encode_image(pixels)

        out["clip_bf16_weights_img_s"] = _rate(forward, args.clip_batch, args.device, args.repeats)
    return out


def _images(num: int, size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(num)]


def bench_segmenter(args) -> dict:
    """Mask2Former alone (the ceiling) and through our segmenter (processor + post-processing)."""
    spec = SegmenterSpec("mask2former", weights="none", config=args.segmenter_config, threshold=0.0,
                         mask_threshold=0.0, overlap_threshold=0.0, processor_size=args.image_size,
                         device=args.device, precision="bf16" if args.device.startswith("cuda") else "fp32")
    segmenter = create_segmenter(spec)
    samples = [Sample(f"k{i}", "s", "c", im) for i, im in enumerate(_images(args.segmenter_batch, args.image_size))]
    inputs = segmenter.processor(images=[s.image for s in samples], return_tensors="pt",
                                 input_data_format="channels_last")
    inputs = {k: v.to(args.device) for k, v in inputs.items()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda") else torch.no_grad()

    def bare():
        with torch.inference_mode(), autocast:
            segmenter.model(**inputs)

    return {
        "segmenter_params_m": round(sum(p.numel() for p in segmenter.model.parameters()) / 1e6, 1),
        "segmenter_bare_img_s": _rate(bare, args.segmenter_batch, args.device, args.repeats),
        "segmenter_ours_img_s": _rate(lambda: segmenter.segment(samples), args.segmenter_batch, args.device,
                                      args.repeats),
    }


def bench_build(args, rates: dict) -> dict:
    """The real job on the demo corpus; its ceiling from the section rates above."""
    from spatext.pipeline import build
    from spatext.pipeline.config import BuildConfig
    from spatext.pipeline.demo_corpus import write_corpus

    corpus = os.path.join(args.out, "corpus")
    write_corpus(corpus, args.num_samples, seed=0, fmt="webdataset", samples_per_shard=64)
    config = BuildConfig(
        input=os.path.join(corpus, "shard-*.tar"), output=os.path.join(args.out, "build"), overwrite=True,
        segmenter="mask2former", segmenter_weights="none", segmenter_config=args.segmenter_config,
        segmenter_threshold=0.0, segmenter_mask_threshold=0.0, segmenter_overlap_threshold=0.0,
        segmenter_processor_size=args.image_size, segmenter_batch_size=args.segmenter_batch,
        clip_model=args.clip_model, clip_pretrained="none", clip_batch_size=args.build_clip_batch,
        device=args.device, precision="bf16" if args.device.startswith("cuda") else "fp32",
        image_size=args.image_size, min_area=0.01,
    )
    started = time.perf_counter()
    _, manifest = build.execute(config, [])
    wall = time.perf_counter() - started
    counts = manifest["counts"]
    images = counts["read"]
    crops = 0
    for path in manifest["shards"]:
        import pyarrow.parquet as pq

        table = pq.read_table(os.path.join(config.output, "shards", path), columns=["segments"])
        crops += sum(len(s) for s in table.column("segments").to_pylist())
    clip_rate = rates.get("clip_bf16_ours_img_s") or rates["clip_fp32_ours_img_s"]
    ceiling_s = images / rates["segmenter_bare_img_s"] + (crops + counts["accepted"]) / clip_rate
    return {
        "build_images": images, "build_accepted": counts["accepted"], "build_crops": crops,
        "build_wall_s": round(wall, 2), "build_img_s": round(images / wall, 2),
        "build_ceiling_s": round(ceiling_s, 2), "build_vs_ceiling": round(ceiling_s / wall, 3),
    }


def main(argv: list[str] | None = None) -> int:
    """Run each section (a failing section is reported, the others still run), print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_output/gpu", help="folder for corpus, build and pipeline_gpu.json")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script itself")
    parser.add_argument("--num-samples", type=int, default=512, help="demo corpus size for the build section")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per measurement")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    smoke = args.smoke
    args.device = "cpu" if smoke else "cuda"
    args.clip_model, args.clip_size, args.clip_batch = ("spatext-tiny", 64, 8) if smoke else ("ViT-L-14", 224, 512)
    args.segmenter_config = "mask2former-tiny" if smoke else "mask2former-swin-large"
    args.image_size, args.segmenter_batch = (128, 2) if smoke else (512, 8)
    args.build_clip_batch = 8 if smoke else 64
    if smoke:
        args.num_samples, args.repeats = min(args.num_samples, 8), 1
    os.makedirs(args.out, exist_ok=True)
    record: dict = {"benchmark": "pipeline_gpu", "smoke": smoke, "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()}
    for name, section in (("clip", bench_clip), ("segmenter", bench_segmenter)):
        try:
            record.update({k: round(v, 1) if isinstance(v, float) else v for k, v in section(args).items()})
        except Exception as exc:  # noqa: BLE001 - a benchmark reports a failing section and runs the rest
            record[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
    try:
        record.update(bench_build(args, record))
    except Exception as exc:  # noqa: BLE001 - as above
        record["build_error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    with open(os.path.join(args.out, "pipeline_gpu.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
    print(f"pipeline_gpu on {record['device']} (torch {record['torch']}), random weights")
    for key, value in record.items():
        print(f"  {key:<32} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
