"""Scoring throughput of the eval metrics, and the Fréchet distance on scipy vs torch, measured in one run.

Images: N demo-corpus samples (``generate_sample``; 256-640 px, their own masks of up to 3 segments >= 5% with the
class names as local prompts, exact ground truth for the ``annotations`` segmenter); the "generated" images are the
references mirrored. CLIP: ``--clip-model`` with random weights (ViT-B-32 by default). Local IoU: the ``annotations``
segmenter (ground truth; measures the metric's own cost) or ``mask2former-tiny`` (random tiny Mask2Former at 128 px,
threshold 0). FID: the CLIP extractor by default; ``--fid-extractor inception-random`` runs the standard FID
Inception-v3 with random weights through the ``--inception-weights`` path (needs torch-fidelity).

Reports images/s of each metric alone (update over batches + compute; best of ``--repeats`` passes, the machines
being shared and noisy) and of all four together, and the Fréchet
distance of two sets of ``--fd-samples`` random ``--fd-dim``-d features from the same statistics: scipy
(float64 ``sqrtm``) vs torch (torchmetrics' ``_compute_fid``, float64, on ``--device``), their agreement and times
(each called once untimed, then the median of ``--fd-repeats`` timed calls).
Prints a table and writes JSON. The README's figures (both with the defaults ``--segmenter annotations``, i.e. no
segmentation model timed, and ``--fid-extractor clip``)::

    python benchmarks/eval_throughput.py --num-images 32 --threads 1 --out bench_output      # CPU, 2 cores
    python benchmarks/eval_throughput.py --num-images 128 --batch 64 --repeats 2 --device cuda --precision bf16 \
        --out bench_output                                                                   # one H100
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import scipy
import scipy.linalg
import torch

from bench_record import write_record
from spatext.eval.clip_distance import GlobalDistance, LocalDistance
from spatext.eval.fid import feature_statistics, fid_update, frechet_distance, make_fid
from spatext.eval.local_iou import LocalIoU
from spatext.pipeline.clip import ClipSpec, load_clip
from spatext.pipeline.demo_corpus import generate_sample
from spatext.pipeline.records import Segment, Segmentation
from spatext.pipeline.segmenters.base import SegmenterSpec, create_segmenter

SEGMENTERS = {
    "annotations": SegmenterSpec(name="annotations"),
    "mask2former-tiny": SegmenterSpec(name="mask2former", weights="none", config="mask2former-tiny", threshold=0.0,
                                      mask_threshold=0.0, overlap_threshold=0.0, processor_size=128),
}


def make_data(num: int, seed: int = 0) -> dict:
    """Demo images, masks (up to 3 segments >= 5%), prompts, annotations; generated = mirrored references."""
    data: dict[str, list] = {"reference": [], "generated": [], "masks": [], "prompts": [], "local": [], "ann": []}
    for index in range(num):
        sample = generate_sample(index, seed)
        ids, counts = np.unique(sample.id_map, return_counts=True)
        big = [int(i) for i, c in sorted(zip(ids, counts, strict=True), key=lambda t: -t[1]) if c >= 0.05 * ids.size]
        names = {int(s["id"]): s["category"] for s in sample.segments}
        masks = np.zeros(sample.id_map.shape, dtype=np.uint8)
        for k, seg_id in enumerate(big[:3], start=1):
            masks[sample.id_map == seg_id] = k
        data["reference"].append(sample.image)
        data["generated"].append(np.ascontiguousarray(sample.image[:, ::-1]))
        data["masks"].append(np.ascontiguousarray(masks[:, ::-1]))
        data["prompts"].append(sample.caption)
        data["local"].append([names[i] for i in big[:3]])
        segments = tuple(Segment(i, n) for i, n in names.items())
        data["ann"].append(Segmentation(np.ascontiguousarray(sample.id_map[:, ::-1]).astype(np.int32), segments))
    return data


def _sync(device: str) -> None:
    """Wait for queued GPU work (timings)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def random_inception_weights(directory: str) -> str:
    """A random-init FID Inception state dict saved to a file (only the weights-file path is exercised)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    real_download, real_load = fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict
    fe.load_state_dict_from_url = lambda *args, **kwargs: {}
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, state, *args, **kwargs: None
    try:
        module = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict = real_download, real_load
    path = os.path.join(directory, "inception-random.pt")
    torch.save(module.state_dict(), path)
    return path


def make_metrics(args: argparse.Namespace, directory: str) -> tuple[dict[str, Callable], dict[str, Callable], dict]:
    """Per metric: an update(batch) and a compute(); plus the FID description."""
    clip = load_clip(ClipSpec(model=args.clip_model, pretrained="none", device=args.device, batch_size=args.batch,
                              precision=args.precision))
    segmenter_spec = SEGMENTERS[args.segmenter]
    segmenter = create_segmenter(SegmenterSpec(**{**segmenter_spec.__dict__, "device": args.device}))
    if args.fid_extractor == "clip":
        fid, description = make_fid("clip", clip=clip, device=args.device)
    else:
        fid, description = make_fid("inception", random_inception_weights(directory), device=args.device)
    g, lo, iou = GlobalDistance(clip), LocalDistance(clip), LocalIoU(segmenter, batch_size=args.batch)

    def fid_batch(b: dict) -> None:
        fid_update(fid, b["reference"], real=True)
        fid_update(fid, b["generated"], real=False)

    updates = {
        "global_distance": lambda b: g.update(b["generated"], b["prompts"]),
        "local_distance": lambda b: lo.update(b["generated"], b["masks"], b["local"]),
        "local_iou": lambda b: iou.update(b["generated"], b["masks"], b["ann"]),
        "fid": fid_batch,
    }
    computes = {"global_distance": g.compute, "local_distance": lo.compute, "local_iou": iou.compute,
                "fid": fid.compute}
    resets = [g.reset, lo.reset, iou.reset, fid.reset]
    return updates, computes, {"fid": description, "resets": resets}


def batches(data: dict, size: int) -> list[dict]:
    """The data cut into batches of ``size`` samples."""
    n = len(data["reference"])
    return [{k: v[i : i + size] for k, v in data.items()} for i in range(0, n, size)]


def _one_pass(names: list[str], updates: dict, computes: dict, parts: list[dict], device: str) -> float:
    """Seconds to update the named metrics over every batch and compute them."""
    _sync(device)
    started = time.perf_counter()
    for part in parts:
        for metric in names:
            updates[metric](part)
    for metric in names:
        computes[metric]()
    _sync(device)
    return time.perf_counter() - started


def time_scoring(args: argparse.Namespace, data: dict, directory: str) -> tuple[dict, dict]:
    """Best-of-``--repeats`` seconds and images/s for each metric alone and all four together."""
    updates, computes, extra = make_metrics(args, directory)
    warm = batches({k: v[:2] for k, v in data.items()}, 2)[0]
    for update in updates.values():  # warm-up (first-call allocations, thread pools)
        update(warm)
    for reset in extra["resets"]:
        reset()
    parts, n = batches(data, args.batch), len(data["reference"])
    results, values = {}, {}
    for name in [*updates, "all four"]:
        names = list(updates) if name == "all four" else [name]
        times = []
        for _ in range(args.repeats):
            times.append(_one_pass(names, updates, computes, parts, args.device))
            values.update({metric: float(computes[metric]()) for metric in names})
            for reset in extra["resets"]:
                reset()
        results[name] = {"seconds": round(min(times), 3), "images_per_s": round(n / min(times), 2),
                         "all_seconds": [round(t, 3) for t in times]}
    return results, {"values": values, "fid": extra["fid"]}


def _timed_calls(call: Callable[[], float], repeats: int, device: str) -> tuple[float, list[float]]:
    """One untimed call (first-call costs: solver start-up, workspace allocation), then ``repeats`` timed calls;
    returns the last call's value and the timed seconds."""
    value = call()
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        value = call()
        _sync(device)
        times.append(time.perf_counter() - started)
    return value, times


def time_frechet(args: argparse.Namespace) -> dict:
    """Fréchet distance from the same statistics: scipy float64 sqrtm vs torchmetrics' eigvals on --device.

    Each is called once untimed, then ``--fd-repeats`` times; the median of the timed calls is reported."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(args.fd_dim, args.fd_dim)) / np.sqrt(args.fd_dim)
    x = torch.from_numpy(rng.normal(size=(args.fd_samples, args.fd_dim)) @ mix)
    y = torch.from_numpy(rng.normal(size=(args.fd_samples, args.fd_dim)) @ mix + 0.1)
    (mu1, s1), (mu2, s2) = feature_statistics(x), feature_statistics(y)
    m1, c1, m2, c2 = (t.numpy() for t in (mu1, s1, mu2, s2))

    def scipy_fd() -> float:
        covmean = scipy.linalg.sqrtm(c1 @ c2)
        return float(((m1 - m2) ** 2).sum()) + float(np.trace(c1 + c2 - 2 * covmean.real))

    on_device = [t.to(args.device) for t in (mu1, s1, mu2, s2)]
    reference, scipy_times = _timed_calls(scipy_fd, args.fd_repeats, "cpu")
    value, torch_times = _timed_calls(lambda: float(frechet_distance(*on_device)), args.fd_repeats, args.device)
    scipy_s, torch_s = statistics.median(scipy_times), statistics.median(torch_times)
    return {
        "dim": args.fd_dim, "samples_per_set": args.fd_samples, "scipy_value": reference, "torch_value": value,
        "abs_diff": abs(value - reference), "rel_diff": abs(value - reference) / abs(reference),
        "scipy_s": round(scipy_s, 3), "torch_s": round(torch_s, 3), "torch_device": args.device,
        "scipy_over_torch": round(scipy_s / torch_s, 2),
        "scipy_all_s": [round(t, 3) for t in scipy_times], "torch_all_s": [round(t, 3) for t in torch_times],
        "timing": f"median of {args.fd_repeats} timed calls after 1 untimed warm-up call, each",
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=32, help="images scored per metric")
    parser.add_argument("--batch", type=int, default=16, help="images per metric update")
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--segmenter", choices=sorted(SEGMENTERS), default="annotations", help="Local IoU segmenter")
    parser.add_argument("--fid-extractor", choices=["clip", "inception-random"], default="clip",
                        help="FID features: CLIP, or the FID Inception-v3 with random weights (torch-fidelity)")
    parser.add_argument("--repeats", type=int, default=3, help="passes per measurement; the fastest is reported")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch's default); 1 gives steadier numbers on a shared machine")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="CLIP precision (cuda)")
    parser.add_argument("--fd-dim", type=int, default=2048, help="feature dimension of the Fréchet comparison")
    parser.add_argument("--fd-samples", type=int, default=5000, help="features per set in the Fréchet comparison")
    parser.add_argument("--fd-repeats", type=int, default=3,
                        help="timed calls of each Fréchet implementation, after one untimed warm-up call; the median "
                        "is reported")
    parser.add_argument("--out", default="bench_output", help="folder for eval_throughput.json")
    args = parser.parse_args(argv)
    for flag in ("batch", "repeats", "fd_repeats", "fd_dim"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("num_images", "fd_samples"):  # a covariance needs two samples per set (FID's and the Fréchet's)
        if getattr(args, flag) < 2:
            parser.error(f"--{flag.replace('_', '-')} must be >= 2, got {getattr(args, flag)}: the Fréchet distance "
                         "needs a covariance of each set, which takes at least two samples")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    return args


def print_table(record: dict) -> None:
    """The human-readable summary."""
    print(f"eval_throughput: {record['num_images']} images, {record['clip_model']} (random init), "
          f"segmenter {record['segmenter']}, FID {record['fid_extractor']}, device {record['device']}, "
          f"{record['torch_threads']} torch threads")
    print(f"  {'metric':<18} {'seconds':>9} {'images/s':>9}")
    for name, row in record["scoring"].items():
        print(f"  {name:<18} {row['seconds']:>9} {row['images_per_s']:>9}")
    fd = record["frechet"]
    print(f"  Fréchet {fd['dim']}-d, {fd['samples_per_set']} per set: scipy sqrtm {fd['scipy_s']} s, "
          f"torch eigvals ({fd['torch_device']}) {fd['torch_s']} s, rel diff {fd['rel_diff']:.2e} ({fd['timing']})")


def main(argv: list[str] | None = None) -> int:
    """Run and report."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    data = make_data(args.num_images)
    with tempfile.TemporaryDirectory() as directory:
        scoring, extra = time_scoring(args, data, directory)
    record = {
        "benchmark": "eval_throughput", "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "num_images": args.num_images, "batch": args.batch, "repeats": args.repeats, "precision": args.precision,
        "clip_model": args.clip_model,
        "pretrained": "none (random init)", "segmenter": args.segmenter, "fid_extractor": args.fid_extractor,
        "fid_description": extra["fid"], "metric_values": extra["values"], "scoring": scoring,
        "frechet": time_frechet(args), "versions": {"torch": torch.__version__, "scipy": scipy.__version__},
        "regions": sum(len(p) for p in data["local"]), "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
    }
    print_table(record)
    write_record(args.out, "eval_throughput.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
