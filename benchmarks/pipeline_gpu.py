"""Build throughput on a GPU: the end-to-end job vs the GPU-only ceiling of its two models, in one run.

Random weights at real sizes: Mask2Former with a Swin-L backbone (configs/mask2former-swin-large.json, 216 M params)
and CLIP ViT-L/14. Sections:
  clip       ViT-L/14 image tower on random pixels: our encode_pixels in fp32 and bf16, and bare bf16 weights (img/s)
  segmenter  Mask2Former on the build's own images (the demo corpus decoded as the build does, batches in corpus
             order): the bare forward over our passes of similar shapes (the ceiling) and over each batch as one
             pass (before passes: padding), our segmenter (device preprocessing + forward + batched panoptic merge,
             pass by pass) and its stages (pre, post), all interleaved, medians (img/s); padding (pixels run / own
             pixels); the bare forward on random squares at --segmenter-batches sizes (launch-bound or not); checks:
             device preprocessing vs the CPU processor (max |difference|, one grey level for scale) and the merge vs
             transformers on the same logits (identical maps / segments)
  build      the real Beam job (DirectRunner) on the demo corpus at 512 px, models on the GPU, in each --build-modes
             set-up (in one process; N worker processes feeding one shared model server; N worker threads sharing
             one model); its images/s and the ceiling for the same work (images / segmenter rate + crops / CLIP
             rate), also with our segmenter's own rate; the GPU's and CPU's use during the build (sampled) and the
             seconds its workers spent in each model step's calls. Results are printed and written as each section
             or set-up ends, so a time limit loses none.
Prints a table, writes JSON. `--smoke` runs tiny models on the CPU to check the script itself.

    python benchmarks/pipeline_gpu.py --out $OUT          # on the GPU machine
    python benchmarks/pipeline_gpu.py --smoke --out /tmp/gpu_smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import statistics
import threading
import time
import traceback
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import torch

from bench_record import build_mode, write_record
from corpus_subset import corpus_subset, replicate_corpus
from spatext.pipeline.clip import ClipSpec, encode_pixels, load_clip
from spatext.pipeline.records import Sample
from spatext.pipeline.segmenters import SegmenterSpec, create_segmenter
from spatext.pipeline.segmenters.panoptic_merge import panoptic_merge


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
    # the CLIP transform on the model's device (uint8 images -> model input) vs on the CPU, and its rate
    images = _images(64, 512)
    on_device = clip.pixel_transform(images, args.device)
    out["clip_transform_device_img_s"] = _rate(lambda: clip.pixel_transform(images, args.device), len(images),
                                               args.device, args.repeats)
    difference = (on_device.cpu() - clip.pixel_transform(images)).abs()
    out["clip_check_transform_device_vs_cpu_max_abs"] = float(difference.max())
    out["clip_check_transform_device_vs_cpu_mean_abs"] = float(difference.mean())
    return out


def _images(num: int, size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(num)]


def _median_seconds(stages: dict[str, Callable[[], object]], device: str, repeats: int) -> dict[str, float]:
    """Median seconds per call of each stage; the stages take turns in every round (after one warm-up round), so
    a noisy neighbour slows them alike."""
    times: dict[str, list[float]] = {name: [] for name in stages}
    for round_ in range(repeats + 1):
        for name, fn in stages.items():
            _sync(device)
            started = time.perf_counter()
            fn()
            _sync(device)
            if round_:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def _float_outputs(outputs) -> SimpleNamespace:
    """The logits the segmenter merges (float32 on the device), for transformers' post-processing too."""
    return SimpleNamespace(class_queries_logits=outputs.class_queries_logits.float(),
                           masks_queries_logits=outputs.masks_queries_logits.float())


def _transformers_post(segmenter, outputs, sizes) -> list[dict]:
    """The reference: transformers' panoptic post-processing (a Python loop per image and per query)."""
    return segmenter.processor.post_process_panoptic_segmentation(
        outputs, threshold=segmenter.spec.threshold, mask_threshold=segmenter.spec.mask_threshold,
        overlap_mask_area_threshold=segmenter.spec.overlap_threshold, label_ids_to_fuse=set(), target_sizes=sizes)


def segmenter_checks(segmenter, outputs, sizes) -> dict:
    """Device path vs reference: preprocessing of non-square images (which the processor resizes) vs the processor on
    the CPU (max |pixel difference|, and one grey level after normalising for scale); the merge vs transformers'
    post-processing on the same logits (identical maps / segment lists, out of the batch)."""
    rng = np.random.default_rng(1)
    short = segmenter.spec.processor_size or 800
    shapes = [(short * 3 // 4, short), (short, short * 3 // 4), (short // 2, short * 2 // 3)]
    samples = [Sample(f"c{i}", "s", "c", rng.integers(0, 256, (*hw, 3), dtype=np.uint8)) for i, hw in enumerate(shapes)]
    cpu = segmenter.processor(images=[s.image for s in samples], return_tensors="pt", input_data_format="channels_last")
    device_inputs, _ = segmenter.preprocess(samples)
    # the device path pads on to the pass grid (bottom and right): compare the processor's part, the rest must be 0
    height, width = cpu["pixel_values"].shape[-2:]
    pixels, mask = device_inputs["pixel_values"].cpu(), device_inputs["pixel_mask"].cpu()
    grid_padding_zero = not any(t[..., height:, :].any() or t[..., width:].any() for t in (pixels, mask))
    reference = _transformers_post(segmenter, _float_outputs(outputs), sizes)
    ours = panoptic_merge(outputs.class_queries_logits.float(), outputs.masks_queries_logits.float(), sizes,
                          segmenter.spec.threshold, segmenter.spec.mask_threshold, segmenter.spec.overlap_threshold)
    same_maps = same_segments = 0
    for ref, our in zip(reference, ours, strict=True):
        same_maps += torch.equal(ref["segmentation"].cpu().to(torch.int32), our.id_map)
        expected = [(i["id"], i["label_id"], i["score"]) for i in ref["segments_info"]]
        same_segments += expected == [(g.id, g.label_id, g.score) for g in our.segments]
    return {
        "segmenter_check_pre_max_abs": float((pixels[..., :height, :width] - cpu["pixel_values"]).abs().max()),
        "segmenter_check_pre_one_level": 1 / (255 * min(segmenter.processor.image_std)),
        "segmenter_check_pre_mask_equal": bool(torch.equal(mask[..., :height, :width], cpu["pixel_mask"])),
        "segmenter_check_pre_grid_padding_zero": grid_padding_zero,
        "segmenter_check_merge_same_maps": f"{same_maps}/{len(ours)}",
        "segmenter_check_merge_same_segments": f"{same_segments}/{len(ours)}",
        "segmenter_check_segments_per_image": round(sum(len(o.segments) for o in ours) / len(ours), 1),
    }


def corpus_images(corpus: str, num: int, image_size: int) -> list[np.ndarray]:
    """The first ``num`` images of the demo corpus decoded and resized as the build does (the build's own inputs:
    their sizes and aspect ratios decide the padding of Mask2Former's passes), in corpus order."""
    import tarfile

    from spatext.pipeline.decode import decode_image

    images = []
    for name in sorted(f for f in os.listdir(corpus) if f.endswith(".tar")):
        with tarfile.open(os.path.join(corpus, name)) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    images.append(decode_image(tar.extractfile(member).read(), image_size))
                    if len(images) == num:
                        return images
    return images


def _padding(inputs: list[dict[str, torch.Tensor]]) -> float:
    """Pixels the model runs over the images' own processed pixels (1.0: no padding)."""
    return sum(i["pixel_mask"].numel() for i in inputs) / sum(float(i["pixel_mask"].sum()) for i in inputs)


def bench_segmenter(args) -> dict:
    """Mask2Former on the build's own images (``corpus_images``, batches of --segmenter-batch in corpus order): the
    bare forward over our passes of similar shapes (the ceiling) and over each batch as one pass (what it did
    before), our segmenter (device preprocessing + forward + merge, pass by pass) and each of its stages, timed
    interleaved, medians (img/s); then the checks on random images."""
    spec = SegmenterSpec("mask2former", weights="none", config=args.segmenter_config, threshold=0.0,
                         mask_threshold=0.0, overlap_threshold=0.0, processor_size=args.image_size,
                         device=args.device, precision="bf16" if args.device.startswith("cuda") else "fp32")
    segmenter = create_segmenter(spec)
    images = corpus_images(args.corpus, args.segmenter_batch * args.segmenter_batches_timed, args.image_size)
    samples = [Sample(f"k{i}", "s", "c", im) for i, im in enumerate(images)]
    batches = [samples[i:i + args.segmenter_batch] for i in range(0, len(samples), args.segmenter_batch)]
    passes = [[batch[i] for i in group] for batch in batches for group in segmenter.pass_groups(batch)]
    pass_inputs = [segmenter.preprocess(part) for part in passes]
    one_pass_inputs = [segmenter.preprocess(batch)[0] for batch in batches]
    pass_outputs = [(segmenter.forward(inputs), sizes) for inputs, sizes in pass_inputs]

    # Random weights at threshold 0 keep all the queries (200 for Swin-L), the merge's worst case; a trained model
    # keeps a few dozen: the same stages at a threshold that keeps --segmenter-kept queries per image on average
    kept_threshold = threshold_keeping([outputs for outputs, _ in pass_outputs], args.segmenter_kept)
    kept_spec = dataclasses.replace(spec, threshold=kept_threshold)

    def kept(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            segmenter.spec = kept_spec
            try:
                return fn()
            finally:
                segmenter.spec = spec
        return run

    stages = {
        "pre": lambda: [segmenter.preprocess(part) for part in passes],
        "bare": lambda: [segmenter.forward(inputs) for inputs, _ in pass_inputs],
        "bare_one_pass": lambda: [segmenter.forward(inputs) for inputs in one_pass_inputs],
        "post": lambda: [segmenter.postprocess(outputs, sizes) for outputs, sizes in pass_outputs],
        "ours": lambda: [segmenter.segment(batch) for batch in batches],
        "post_kept": kept(lambda: [segmenter.postprocess(outputs, sizes) for outputs, sizes in pass_outputs]),
        "ours_kept": kept(lambda: [segmenter.segment(batch) for batch in batches]),
    }
    seconds = _median_seconds(stages, args.device, args.repeats)
    record = {"segmenter_params_m": round(sum(p.numel() for p in segmenter.model.parameters()) / 1e6, 1),
              "segmenter_batch": args.segmenter_batch, "segmenter_queries": segmenter.model.config.num_queries,
              "segmenter_images": f"{len(samples)} demo corpus images at {args.image_size} px, as the build decodes",
              "segmenter_passes_per_batch": round(len(passes) / len(batches), 2),
              "segmenter_padding_passes": round(_padding([inputs for inputs, _ in pass_inputs]), 3),
              "segmenter_padding_one_pass": round(_padding(one_pass_inputs), 3)}
    record.update({f"segmenter_{name}_img_s": len(samples) / s for name, s in seconds.items()})
    record["segmenter_ours_vs_bare"] = round(seconds["bare"] / seconds["ours"], 3)
    record["segmenter_kept_threshold"] = kept_threshold
    record["segmenter_kept_per_image"] = round(kept_per_image([o for o, _ in pass_outputs], kept_threshold), 1)
    record["segmenter_ours_kept_vs_bare"] = round(seconds["bare"] / seconds["ours_kept"], 3)
    record["segmenter_passes_vs_one_pass"] = round(seconds["bare_one_pass"] / seconds["bare"], 3)
    random = [Sample(f"r{i}", "s", "c", im) for i, im in enumerate(_images(args.segmenter_batch, args.image_size))]
    inputs, sizes = segmenter.preprocess(random)
    record.update(segmenter_checks(segmenter, segmenter.forward(inputs), sizes))
    record.update(bare_batch_sweep(segmenter, args))
    return record


def _query_scores(outputs) -> torch.Tensor:
    """Each query's score as the merge reads it: its best class probability, -1 where that class is "no object"."""
    probs = outputs.class_queries_logits.float().softmax(-1)
    scores, labels = probs.max(-1)
    return torch.where(labels == probs.shape[-1] - 1, -1.0, scores)


def threshold_keeping(outputs: list, per_image: int) -> float:
    """The score threshold above which ``per_image`` queries per image survive on average (the merge keeps a query
    whose score is above the threshold and whose class is not "no object"); 0 when fewer than that survive at 0."""
    scores = torch.cat([_query_scores(o).flatten() for o in outputs])
    images = sum(o.class_queries_logits.shape[0] for o in outputs)
    valid = scores[scores > 0].sort(descending=True).values
    wanted = per_image * images
    return 0.0 if len(valid) <= wanted else float(valid[wanted])


def kept_per_image(outputs: list, threshold: float) -> float:
    """Queries per image whose score is above ``threshold`` (and not "no object")."""
    scores = torch.cat([_query_scores(o).flatten() for o in outputs])
    return float((scores > threshold).sum()) / sum(o.class_queries_logits.shape[0] for o in outputs)


def bare_batch_sweep(segmenter, args) -> dict:
    """The bare forward's rate at other batch sizes (--segmenter-batches): a forward whose rate grows with the batch
    is bound by the CPU launching kernels, not by the GPU, and a larger --segmenter-batch-size raises the ceiling."""
    out = {}
    for batch in args.segmenter_batches:
        samples = [Sample(f"b{i}", "s", "c", im) for i, im in enumerate(_images(batch, args.image_size))]
        inputs, _ = segmenter.preprocess(samples)
        seconds = _median_seconds({"bare": lambda i=inputs: segmenter.forward(i)}, args.device, args.repeats)
        out[f"segmenter_bare_batch{batch}_img_s"] = batch / seconds["bare"]
    return out


def write_build_corpus(args) -> str:
    """The demo corpus of --num-samples rounded up to whole copies (webdataset, about 16 tars): drawn images (~50 ms
    each) up to --unique-samples, then renamed copies (the model work per image is the same); returns its folder."""
    from spatext.pipeline.demo_corpus import write_corpus

    corpus = os.path.join(args.out, "corpus")
    unique = min(args.num_samples, args.unique_samples)
    copies = -(-args.num_samples // unique)
    write_corpus(corpus, unique, seed=0, fmt="webdataset", samples_per_shard=max(1, unique * copies // 16))
    replicate_corpus(corpus, copies)
    return corpus


class UsageSampler:
    """GPU and CPU use sampled on a thread while a build runs: the share of each period in which the GPU ran a kernel
    (NVML, through ``torch.cuda.utilization``; None without a GPU or without NVML) and the machine's CPU use (psutil,
    all cores), as means over the whole run and over its second half (start-up left out)."""

    def __init__(self, device: str, period: float = 0.25) -> None:
        import psutil

        self.period, self._psutil = period, psutil
        self.gpu = device.startswith("cuda") and self._nvml_answers()
        self.samples: list[tuple[float, float | None, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _nvml_answers() -> bool:
        errors: tuple[type[Exception], ...] = (ModuleNotFoundError, RuntimeError)
        try:
            import pynvml

            errors += (pynvml.NVMLError,)  # e.g. NotSupported, on a MIG slice
        except ModuleNotFoundError:
            pass
        try:
            torch.cuda.utilization()
        except errors as exc:  # no pynvml, or NVML not answering: leave the GPU out
            print(f"  (no GPU utilisation: {type(exc).__name__}: {exc})", flush=True)
            return False
        return True

    def _run(self) -> None:
        started = time.perf_counter()
        self._psutil.cpu_percent(interval=None)  # the first reading has nothing to compare with
        while not self._stop.wait(self.period):
            gpu = float(torch.cuda.utilization()) if self.gpu else None
            self.samples.append((time.perf_counter() - started, gpu, self._psutil.cpu_percent(interval=None)))

    def __enter__(self) -> UsageSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def means(self) -> dict[str, float]:
        """``gpu_util`` / ``cpu_util`` (percent) over the run, ``*_second_half`` over its second half."""
        if not self.samples:
            return {}
        half = self.samples[-1][0] / 2
        out = {}
        for name, index in (("gpu_util", 1), ("cpu_util", 2)):
            if index == 1 and not self.gpu:
                continue
            out[name] = round(statistics.fmean(s[index] for s in self.samples), 1)
            late = [s[index] for s in self.samples if s[0] >= half]
            out[f"{name}_second_half"] = round(statistics.fmean(late), 1) if late else None
        return out


def bench_build(args, rates: dict, emit: Callable[[dict], None]) -> None:
    """The real job on the demo corpus in each of --build-modes, each mode's results emitted as soon as it ends; the
    ceiling from the section rates above."""
    import pyarrow.parquet as pq

    from spatext.pipeline import build
    from spatext.pipeline.config import BuildConfig

    corpus = args.corpus
    warm = True  # the first build of a process pays one-time costs (imports, CUDA kernels): run one untimed first
    # the score threshold of the segmenter section that keeps --segmenter-kept queries per image, as a trained model
    # does (0 without that section: every query kept, the merge's worst case)
    threshold = rates.get("segmenter_kept_threshold", 0.0)
    emit({"build_segmenter_threshold": threshold})
    for mode in args.build_modes.split(","):
        beam_args, models = build_mode(mode.strip())
        key = "build_" + mode.strip().replace(":", "")
        config = BuildConfig(
            input=os.path.join(corpus, "shard-*.tar"), output=os.path.join(args.out, key), overwrite=True,
            segmenter="mask2former", segmenter_weights="none", segmenter_config=args.segmenter_config,
            segmenter_threshold=threshold, segmenter_mask_threshold=0.0, segmenter_overlap_threshold=0.0,
            segmenter_processor_size=args.image_size, segmenter_batch_size=args.segmenter_batch,
            clip_model=args.clip_model, clip_pretrained="none", clip_batch_size=args.build_clip_batch,
            device=args.device, precision="bf16" if args.device.startswith("cuda") else "fp32",
            image_size=args.image_size, min_area=0.01, **models,
        )
        try:
            if warm:
                warm_up = dataclasses.replace(config, input=corpus_subset(corpus, 1 / 16), model_sharing="process",
                                              model_copies=None, model_server="thread",
                                              output=config.output + "-warm-up")
                build.execute(warm_up, [])
                warm = False
            quarter = dataclasses.replace(config, input=corpus_subset(corpus, 0.25), output=config.output + "-quarter")
            started = time.perf_counter()
            _, quarter_manifest = build.execute(quarter, beam_args)
            quarter_wall = time.perf_counter() - started
            started = time.perf_counter()
            with UsageSampler(args.device) as usage:
                result, manifest = build.execute(config, beam_args)
            wall = time.perf_counter() - started
        except Exception as exc:  # noqa: BLE001 - a benchmark reports a failing mode and runs the rest
            traceback.print_exc()
            emit({f"{key}_error": f"{type(exc).__name__}: {exc}"})
            continue
        record: dict = {}
        counts = manifest["counts"]
        images = counts["read"]
        # steady state: the images between the quarter and the full build over the time between them
        marginal = (images - quarter_manifest["counts"]["read"]) / (wall - quarter_wall) if wall > quarter_wall else 0.0
        record[f"{key}_quarter_wall_s"] = round(quarter_wall, 2)
        record[f"{key}_marginal_img_s"] = round(marginal, 2)  # 0.0: the full build was not slower (noise)
        crops = sum(
            len(segments)
            for path in manifest["shards"]
            for segments in pq.read_table(os.path.join(config.output, "shards", path), columns=["segments"])
            .column("segments").to_pylist()
        )
        for stage, size in build.mean_batch_sizes(result).items():
            record[f"{key}_{stage}_mean_batch"] = round(size, 2)
        for stage, calls in build.model_calls(result).items():
            # summed over workers: above the wall time, workers waited for the shared model
            record[f"{key}_{stage}_call_s"] = round(calls["seconds"], 2)
        record.update({f"{key}_{name}": value for name, value in usage.means().items()})
        record.update({
            f"{key}_images": images, f"{key}_accepted": counts["accepted"], f"{key}_crops": crops,
            f"{key}_wall_s": round(wall, 2), f"{key}_img_s": round(images / wall, 2),
        })
        clip_rate = rates.get("clip_bf16_ours_img_s") or rates.get("clip_fp32_ours_img_s")
        if clip_rate and rates.get("segmenter_bare_img_s"):  # the ceiling needs the clip and segmenter sections
            ceiling_s = images / rates["segmenter_bare_img_s"] + (crops + counts["accepted"]) / clip_rate
            record[f"{key}_ceiling_s"] = round(ceiling_s, 2)
            record[f"{key}_vs_ceiling"] = round(ceiling_s / wall, 3)
            record[f"{key}_marginal_vs_ceiling"] = round(marginal * ceiling_s / images, 3)
        ours = rates.get("segmenter_ours_kept_img_s" if threshold else "segmenter_ours_img_s")
        if clip_rate and ours:  # the same with our segmenter's own rate (pre + post) at the build's threshold
            ours_s = images / ours + (crops + counts["accepted"]) / clip_rate
            record[f"{key}_marginal_vs_ceiling_ours"] = round(marginal * ours_s / images, 3)
        emit(record)


def _rounded(key: str, value):
    """Rates to 0.1 img/s, other floats (ratios, pixel differences) to 4 significant digits; thresholds exact (the
    build runs at the segmenter section's recorded threshold)."""
    if not isinstance(value, float) or key.endswith("_threshold"):
        return value
    return round(value, 1) if key.endswith("_img_s") else float(f"{value:.4g}")


def main(argv: list[str] | None = None) -> int:
    """Run each section (a failing section is reported, the others still run), print the table, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_output/gpu", help="folder for corpus, build and pipeline_gpu.json")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script itself")
    parser.add_argument("--num-samples", type=int, default=1024,
                        help="demo corpus size for the build section (a quarter-size build runs too: the difference "
                        "is the steady-state rate, start-up excluded)")
    parser.add_argument("--unique-samples", type=int, default=512,
                        help="distinct images drawn for the build's corpus; the rest of --num-samples are renamed "
                        "copies of them")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per measurement")
    parser.add_argument("--build-modes", default=None,
                        help="comma-separated build set-ups: in_process, processes:N (N worker processes sharing one "
                        "model server), processes:N:copiesM (M model servers per model), processes:N:ownserver (the "
                        "server a process of its own, --model-server process; both may be given), threads:N (N "
                        "worker threads sharing one model); default "
                        "in_process,processes:8,threads:8 (smoke: in_process,processes:2,threads:2)")
    parser.add_argument("--segmenter-batch", type=int, default=8,
                        help="images per segmenter call, in the segmenter section and the build (smoke: 2)")
    parser.add_argument("--segmenter-batches", default=None,
                        help="comma-separated extra batch sizes for the bare Mask2Former forward (default 16,32; "
                        "smoke: 4)")
    parser.add_argument("--segmenter-kept", type=int, default=None,
                        help="queries per image a trained model keeps, for the segmenter stages timed at a threshold "
                        "that keeps that many (random weights at threshold 0 keep all of them); default 24 (smoke: "
                        "4 of the tiny model's 16)")
    parser.add_argument("--sections", default="clip,segmenter,build",
                        help="comma-separated sections to run (clip, segmenter, build; build uses the others' rates)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    smoke = args.smoke
    args.device = "cpu" if smoke else "cuda"
    args.clip_model, args.clip_size, args.clip_batch = ("spatext-tiny", 64, 8) if smoke else ("ViT-L-14", 224, 512)
    args.segmenter_config = "mask2former-tiny" if smoke else "mask2former-swin-large"
    args.image_size = 128 if smoke else 512
    args.segmenter_batch = 2 if smoke else args.segmenter_batch
    if args.segmenter_batch < 1:
        parser.error(f"--segmenter-batch must be >= 1, got {args.segmenter_batch}")
    args.segmenter_kept = (4 if smoke else 24) if args.segmenter_kept is None else args.segmenter_kept
    if args.segmenter_kept < 1:
        parser.error(f"--segmenter-kept must be >= 1, got {args.segmenter_kept}")
    # the build's images the segmenter section times: 32 (a few batches), at least one batch
    args.segmenter_batches_timed = 2 if smoke else max(1, 32 // args.segmenter_batch)
    batches = args.segmenter_batches or ("4" if smoke else "16,32")
    try:
        args.segmenter_batches = [int(b) for b in batches.split(",")]
    except ValueError:
        parser.error(f"--segmenter-batches: comma-separated integers, got {batches!r}")
    if min(args.segmenter_batches) < 1:
        parser.error(f"--segmenter-batches must be >= 1, got {batches!r}")
    args.build_clip_batch = 8 if smoke else 64
    args.build_modes = args.build_modes or ("in_process,processes:2,threads:2" if smoke
                                            else "in_process,processes:8,threads:8")
    for mode in args.build_modes.split(","):
        try:
            build_mode(mode.strip())
        except ValueError as exc:
            parser.error(f"--build-modes: {exc}")
    if args.num_samples < 1 or args.unique_samples < 1:
        parser.error("--num-samples and --unique-samples must be >= 1")
    if smoke:
        args.num_samples, args.unique_samples, args.repeats = min(args.num_samples, 16), 8, 1
    os.makedirs(args.out, exist_ok=True)
    record: dict = {"benchmark": "pipeline_gpu", "smoke": smoke, "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()}
    sections = {name.strip() for name in args.sections.split(",")}
    unknown = sections - {"clip", "segmenter", "build"}
    if unknown:
        parser.error(f"--sections: unknown {', '.join(sorted(unknown))}; valid choices: clip, segmenter, build")

    def emit(results: dict) -> None:
        """Add results to the record, print them and rewrite the JSON: a run stopped by its time limit keeps
        everything that finished before."""
        record.update(results)
        for key, value in results.items():
            print(f"  {key:<32} {value}", flush=True)
        write_record(args.out, "pipeline_gpu.json", record)

    print(f"pipeline_gpu on {record['device']} (torch {record['torch']}), random weights", flush=True)
    if sections & {"segmenter", "build"}:
        args.corpus = write_build_corpus(args)
    for name, section in (("clip", bench_clip), ("segmenter", bench_segmenter)):
        if name not in sections:
            continue
        try:
            emit({k: _rounded(k, v) for k, v in section(args).items()})
        except Exception as exc:  # noqa: BLE001 - a benchmark reports a failing section and runs the rest
            traceback.print_exc()
            emit({f"{name}_error": f"{type(exc).__name__}: {exc}"})
    if "build" in sections:
        try:
            bench_build(args, record, emit)
        except Exception as exc:  # noqa: BLE001 - as above
            traceback.print_exc()
            emit({"build_error": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
