"""SpaText on a GPU: training throughput at the SD-1.x shape, sampling-time ratios at 512 px, and the real trainer.

Random weights at real sizes. Sections (each one timed side by side in this run; a failing section is recorded and
the next one runs):
  train     ``latent-sd15`` (SD-1.x UNet, 860 M params, + 768 ST channels): one training step (forward, backward,
            AdamW) at batch 32 on 64x64 latents, bf16 autocast with fp32 weights (what ``--mixed-precision bf16``
            does): SpaText (ST built on the GPU from 512x512 label maps) vs the same UNet without ST channels, as in
            train_step.py. Anchor: the plain SD-1.x UNet trains at 85 samples/s at batch 32 on an H100.
  sampling  the guidance modes of sampling.py at 512 px (64x64 latents), 50 DDIM steps, bf16 weights, local
            prompts through ViT-L/14's text tower: joint / plain (goal <= 1.05), per-condition / plain (<= 1.55),
            and both SpaText modes with ST concatenated and convolved at every step (the pre-cache reference).
  trainer   ``spatext train`` itself on the GPU (latent-tiny, demo shards, bf16, checkpoint + resume, sample grid)
            and ``spatext sample`` on the run: a check that the scripts run on cuda, not a timing.
Prints tables, writes ``train_gpu.json`` after every section. ``--smoke`` runs tiny shapes on the CPU.

    python benchmarks/train_gpu.py --out $OUT              # on the GPU machine (about 3-5 minutes)
    python benchmarks/train_gpu.py --smoke --out /tmp/train_gpu_smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sampling import print_table, run_sampling  # noqa: E402
from train_step import Bench, bench_config, summarize  # noqa: E402

from spatext.model.config import get_config  # noqa: E402


def settings(smoke: bool) -> dict:
    """Shapes and counts of the full run or of the CPU smoke run."""
    if smoke:
        return {"device": "cpu", "dtype": None, "config": bench_config([32, 64], 1, 8, 64, 32, "spatext-tiny"),
                "clip": "spatext-tiny", "batch": 2, "steps": 2, "warmup": 1, "sample_steps": 2, "repeats": 1,
                "images": [1], "precision": "no"}
    return {"device": "cuda", "dtype": torch.bfloat16, "config": get_config("latent-sd15"), "clip": "ViT-L-14",
            "batch": 32, "steps": 15, "warmup": 5, "sample_steps": 50, "repeats": 3, "images": [1, 4],
            "precision": "bf16"}


def section_train(s: dict) -> dict:
    """SpaText vs plain training step at the configured shape; halves the batch on out-of-memory."""
    batch = s["batch"]
    while True:
        try:
            bench = Bench(s["config"], batch, 8 * s["config"].sample_size, 3, s["device"], s["dtype"])
            if s["device"] == "cuda":
                torch.cuda.reset_peak_memory_stats()
            result = summarize(bench.time_steps(s["steps"], s["warmup"]), batch)
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
        bench = None  # outside the except block, so that the failed step's tensors can be freed
        gc.collect()
        torch.cuda.empty_cache()
        logging.warning("out of memory at batch %d; retrying at %d", batch, batch // 2)
        batch //= 2
    result["batch"] = batch
    result["flops"] = bench.flops()
    result["flop_ratio"] = result["flops"]["spatext"] / result["flops"]["plain"]
    result["unet_params"] = sum(p.numel() for p in bench.unet.parameters())
    if s["device"] == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    del bench
    print(f"train: UNet {result['unet_params'] / 1e6:.0f} M params, batch {batch}, {s['precision']}")
    print("| variant | median step (s) | samples/s |\n|---|---|---|")
    for name in ("plain", "spatext"):
        print(f"| {name} | {result['median_s'][name]:.4f} | {result['samples_per_s'][name]:.1f} |")
    low, high = result["paired_ratio_ci95"]
    print(f"SpaText / plain step time, median of {result['pairs']} paired steps: {result['paired_ratio_median']:.3f} "
          f"(95% CI {low:.3f}-{high:.3f}; goal <= {result['goal']}: {result['verdict']}; ratio of the medians "
          f"{result['ratio_spatext_over_plain']:.3f}; anchor: plain 85 samples/s)")
    return result


def section_sampling(s: dict) -> dict:
    """The three guidance modes at each images-per-call setting."""
    out = {}
    for images in s["images"]:
        dtype = s["dtype"] or torch.float32
        result = run_sampling(s["config"], s["clip"], s["sample_steps"], s["repeats"], images, s["device"], dtype)
        print(f"sampling: {result['size']} px, {s['sample_steps']} steps, {images} image(s)/call, {result['dtype']}")
        print_table(result)
        out[f"images_{images}"] = result
    return out


def section_trainer(s: dict, folder: str) -> dict:
    """``spatext train`` (bf16 on cuda) for 4 steps, resumed to 6, then ``spatext sample``; what it wrote."""
    from accelerate.state import AcceleratorState

    from spatext.model import sample, train
    from spatext.model.tiny_base import write_tiny_base_model
    from spatext.pipeline import build
    from spatext.pipeline.demo_corpus import write_corpus

    write_corpus(os.path.join(folder, "corpus"), 12, seed=11, fmt="webdataset", samples_per_shard=6)
    build.run(["--input", os.path.join(folder, "corpus", "shard-*.tar"), "--output", os.path.join(folder, "build"),
               "--clip-model", "spatext-tiny", "--clip-pretrained", "none", "--image-size", "256"])
    base = write_tiny_base_model(os.path.join(folder, "base"))
    run = os.path.join(folder, "run")
    argv = ["--data", os.path.join(folder, "build"), "--config", "latent-tiny", "--base-model", base, "--output", run,
            "--train-batch-size", "4", "--mixed-precision", s["precision"], "--checkpointing-steps", "2",
            "--sample-every", "2", "--num-validation", "2", "--sample-steps", "4"]
    started = time.perf_counter()
    for steps, extra in ((4, []), (6, ["--resume-from-checkpoint", "latest"])):
        try:
            train.main([*argv, "--max-train-steps", str(steps), *extra])
        finally:
            AcceleratorState._reset_state()
    with open(os.path.join(run, "run.json")) as f:
        record = json.load(f)
    scene = os.path.join(folder, "scene.json")
    with open(scene, "w") as f:
        json.dump({"prompt": "a ball on sand", "regions": [{"prompt": "sand", "box": [0, 0.5, 1, 1]}]}, f)
    sample.main(["--run", run, "--scene", scene, "--out", os.path.join(folder, "out.png"), "--steps", "4"])
    result = {"global_step": record["global_step"], "device": record["accelerate"]["device"],
              "checkpoints": sorted(os.listdir(os.path.join(run, "checkpoints"))),
              "samples": sorted(os.listdir(os.path.join(run, "samples"))),
              "sample_written": os.path.isfile(os.path.join(folder, "out.png")),
              "wall_s": round(time.perf_counter() - started, 1)}
    print(f"trainer: {result}")
    return result


def main(argv: list[str] | None = None) -> int:
    """Run every section, print tables, write JSON after each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script itself)")
    parser.add_argument("--sections", default="train,sampling,trainer", help="comma-separated sections to run")
    parser.add_argument("--out", default="bench_output", help="folder for train_gpu.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = settings(args.smoke)
    if s["device"] == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device; use --smoke on a CPU machine")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results = {"device": torch.cuda.get_device_name() if s["device"] == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "smoke": args.smoke, "config": s["config"].to_dict()}
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        sections = {"train": lambda: section_train(s), "sampling": lambda: section_sampling(s),
                    "trainer": lambda: section_trainer(s, folder)}
        for name in args.sections.split(","):
            started = time.perf_counter()
            try:
                results[name] = sections[name]()
            except Exception:  # record and go on: one GPU session should bring back every section it can
                results[name] = {"error": traceback.format_exc()}
                print(f"{name}: FAILED\n{results[name]['error']}")
            results[name + "_wall_s"] = round(time.perf_counter() - started, 1)
            if s["device"] == "cuda":
                torch.cuda.empty_cache()
            with open(os.path.join(args.out, "train_gpu.json"), "w") as f:
                json.dump(results, f, indent=2, default=str)
    failed = [name for name in args.sections.split(",") if "error" in results.get(name, {})]
    print(f"train_gpu: {'FAILED ' + ', '.join(failed) if failed else 'all sections OK'}; "
          f"{os.path.join(args.out, 'train_gpu.json')}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
