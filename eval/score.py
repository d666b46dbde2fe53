"""``spatext eval score``: metrics of generations folders against a benchmark, written as a report.

    spatext eval score --benchmark bench/coco-few --generations gen/reference gen/concat gen/spatext --out report/

Per generations folder (one report row, labelled by its method, plus ``(PERTURB)`` when it was generated from
perturbed masks): Global distance (per sample), Local distance and Local IoU (per region), each with its mean over
pairs and a 95% percentile bootstrap interval (``--bootstrap`` resamples, seeded by ``--seed``) that resamples
*samples* (a sample's regions stay together); ``--bootstrap 0`` reports the means without intervals, otherwise it
takes at least ``MIN_BOOTSTRAP`` resamples (fewer give a meaningless 2.5-97.5% percentile interval). A percentile
interval need not contain the mean (skewed or few samples); charts clip such error bars at zero. FID against the
benchmark's reference images as a point value (no interval: FID is a set statistic and a bootstrap would need one
feature pass per resample).

Every generations folder is checked before any model loads or any scoring: it must be made from this benchmark (the
same ``benchmark_fingerprint``) and hold exactly one image per benchmark sample (missing and extra keys are named).
Weights that cannot be loaded (e.g. ``--clip-pretrained openai`` or the default Inception FID offline) raise
``ModelLoadError``, which the CLI prints as a one-line error.

Local IoU segmenter (``--segmenter``): ``annotations`` is ground truth of the *real* images, so it is only defined
for ``reference`` (the benchmark masks are the reference image's own segments, which makes its IoU exactly 1.0: a
check of the IoU path and the upper bound); for other methods the IoU is reported as not measured. Generated images
need a real segmenter (``mask2former`` with ``--segmenter-weights``; random weights only produce segments at zero
thresholds, as the tests do).

``--mask-perturb KIND:PX``: the Local distance and Local IoU are computed again with perturbed *input* masks, and the
report adds a mask-sensitivity table (perturbed minus unperturbed). Regions that vanish under the perturbation are
left out of the perturbed means (their count is reported). To measure how *generation* reacts to inaccurate masks,
generate with ``spatext eval generate --mask-perturb`` and score against the benchmark (rows side by side).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from spatext.eval.benchmark_set import (
    INFO_FILE,
    BenchmarkSample,
    benchmark_fingerprint,
    load_benchmark,
    read_benchmark_info,
)
from spatext.eval.clip_distance import global_pairs, local_pairs
from spatext.eval.errors import ModelLoadError
from spatext.eval.fid import EXTRACTORS, fid_summary, fid_update, make_fid
from spatext.eval.generate import INFO, perturb_sample, provenance_unknown, read_generations
from spatext.eval.local_iou import local_iou_pairs
from spatext.eval.masks import MaskPerturbation
from spatext.eval.outputs import a_few, is_same_or_inside
from spatext.paths import leaves
from spatext.pipeline.clip import RANDOM_INIT_LABEL, ClipModel, ClipSpec, load_clip
from spatext.pipeline.image_formats import OPEN_IMAGE_FORMATS
from spatext.pipeline.records import Segment, Segmentation
from spatext.pipeline.segmenters import SegmenterSpec, create_segmenter
from spatext.pipeline.weights import file_sha256

logger = logging.getLogger(__name__)

MIN_BOOTSTRAP = 100  # resamples; 0 = no intervals


@dataclass(frozen=True)
class ScoreSpec:
    """What ``score`` measures (one config object; the CLI flags map to its fields)."""

    benchmark: str
    generations: tuple[str, ...]
    out: str
    segmenter: SegmenterSpec = field(default_factory=lambda: SegmenterSpec(name="annotations"))
    clip: ClipSpec = field(default_factory=ClipSpec)
    fid_extractor: str = "inception"
    inception_weights: str | None = None
    fid_antialias: bool = False
    mask_perturb: MaskPerturbation | None = None
    bootstrap: int = 1000
    seed: int = 0
    grid_samples: int = 4

    def __post_init__(self) -> None:
        """Reject invalid settings with the flag that sets them."""
        if not self.generations:
            raise ValueError("--generations: give at least one generations folder")
        if self.fid_extractor not in EXTRACTORS:
            raise ValueError(f"--fid-extractor {self.fid_extractor!r} is not valid; choose one of {EXTRACTORS}")
        if self.grid_samples < 1:
            raise ValueError(f"--grid-samples must be >= 1 (rows of the image grid), got {self.grid_samples}")
        if self.bootstrap != 0 and self.bootstrap < MIN_BOOTSTRAP:
            raise ValueError(f"--bootstrap must be 0 (means without intervals) or >= {MIN_BOOTSTRAP} resamples for "
                             f"a 95% percentile interval, got {self.bootstrap}")


def bootstrap_interval(groups: list[np.ndarray], resamples: int, seed: int) -> dict:
    """Mean over all values and a 95% percentile bootstrap interval resampling the groups (samples).

    ``resamples`` 0: the mean only (``ci_low`` / ``ci_high`` None). The percentile interval is not centred on the
    mean and need not contain it.
    """
    sums = np.array([g.sum() for g in groups], dtype=np.float64)
    counts = np.array([g.size for g in groups], dtype=np.float64)
    if counts.sum() == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "n_pairs": 0, "n_samples": len(groups)}
    if resamples == 0:
        return {"mean": float(sums.sum() / counts.sum()), "ci_low": None, "ci_high": None,
                "n_pairs": int(counts.sum()), "n_samples": len(groups), "resamples": 0}
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(groups), size=(resamples, len(groups)))
    total = counts[index].sum(axis=1)
    means = sums[index].sum(axis=1)[total > 0] / total[total > 0]
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(sums.sum() / counts.sum()), "ci_low": float(low), "ci_high": float(high),
            "n_pairs": int(counts.sum()), "n_samples": len(groups), "resamples": resamples}


def _split(values: torch.Tensor, counts: list[int]) -> list[np.ndarray]:
    """Split a flat per-pair vector into per-sample groups."""
    return list(np.split(values.numpy(), np.cumsum(counts)[:-1])) if counts else []


def perturbed_inputs(samples: list[BenchmarkSample], perturb: MaskPerturbation) -> tuple[list, list, int]:
    """Perturbed index maps renumbered 1..K' (vanished regions dropped), their prompts, and the vanished count."""
    moved = [perturb_sample(sample, perturb) for sample in samples]
    return [s.masks for s, _ in moved], [s.local_prompts for s, _ in moved], sum(n for _, n in moved)


def _annotations(samples: list[BenchmarkSample]) -> list[Segmentation]:
    """The benchmark masks as ground-truth segmentations of the reference images."""
    return [Segmentation(sample.masks.astype(np.int32), tuple(Segment(r.index, r.prompt) for r in sample.regions))
            for sample in samples]


class Scorer:
    """Loaded models (CLIP, segmenter, FID with the real side filled) and the benchmark, shared by every folder."""

    def __init__(self, spec: ScoreSpec, samples: list[BenchmarkSample]) -> None:
        """Load CLIP, the segmenter and the FID metric; add the reference images to FID's real side."""
        self.spec, self.samples = spec, samples
        self.benchmark_sha256 = file_sha256(os.path.join(spec.benchmark, INFO_FILE))
        self.benchmark_fingerprint = benchmark_fingerprint(spec.benchmark)
        self.clip = _load_clip(spec.clip)
        self.segmenter = create_segmenter(spec.segmenter)
        self.fid, self.fid_description = make_fid(spec.fid_extractor, spec.inception_weights, self.clip,
                                                  antialias=spec.fid_antialias)
        self.fid.reset_real_features = False  # reset() then clears the generated side only
        fid_update(self.fid, [s.reference for s in samples], real=True)

    def local_iou(self, method: str, images: list[np.ndarray], masks: list[np.ndarray]) -> torch.Tensor | None:
        """Per-region IoUs, or None where the segmenter cannot judge these images (annotations, not reference)."""
        if self.spec.segmenter.name == "annotations":
            if method != "reference":
                return None
            return local_iou_pairs(images, masks, self.segmenter, _annotations(self.samples))
        return local_iou_pairs(images, masks, self.segmenter)

    def pair_metrics(self, method: str, images: list[np.ndarray], masks: list[np.ndarray],
                     prompts: list[list[str]]) -> dict:
        """Local distance and Local IoU per sample group, with their means and bootstrap intervals."""
        counts = [len(p) for p in prompts]
        out = {"local_distance": _split(local_pairs(images, masks, prompts, self.clip), counts)}
        iou = self.local_iou(method, images, masks)
        out["local_iou"] = None if iou is None else _split(iou, counts)
        return out

    def summarise(self, groups: dict) -> dict:
        """Bootstrap summaries of per-sample groups (None stays None: not measured)."""
        return {name: None if value is None else bootstrap_interval(value, self.spec.bootstrap, self.spec.seed)
                for name, value in groups.items()}

    def fid_value(self, images: list[np.ndarray]) -> dict:
        """FID of the images against the references (a point value)."""
        if len(images) < 2:
            return {"fid": None, "note": "FID needs at least 2 images", **self.fid_description}
        self.fid.reset()
        fid_update(self.fid, images, real=False)
        return fid_summary(self.fid, self.fid_description)

    def score_folder(self, path: str, info: dict | None = None) -> dict:
        """Every metric of one generations folder (``info``: its ``check_generations`` record, when checked)."""
        if info is None:
            info = check_generations(path, self.spec.benchmark, self.samples, self.benchmark_fingerprint,
                                     self.benchmark_sha256)
        images = [_read_image(os.path.join(path, info["images"][s.key]), s) for s in self.samples]
        method = info["method"]
        masks = [s.masks for s in self.samples]
        prompts = [s.local_prompts for s in self.samples]
        groups = {"global_distance": _split(global_pairs(images, [s.prompt for s in self.samples], self.clip),
                                            [1] * len(images))}
        groups.update(self.pair_metrics(method, images, masks, prompts))
        result = {"label": method + (f" ({info['mask_perturb']})" if info.get("mask_perturb") else ""),
                  "method": method, "generations": os.path.abspath(path), "generation": _brief(info),
                  "num_images": len(images), "metrics": self.summarise(groups), "fid": self.fid_value(images),
                  "per_sample": _per_sample(self.samples, groups)}
        if self.spec.mask_perturb is not None:
            moved, moved_prompts, vanished = perturbed_inputs(self.samples, self.spec.mask_perturb)
            perturbed = self.summarise(self.pair_metrics(method, images, moved, moved_prompts))
            result["mask_sensitivity"] = _sensitivity(result["metrics"], perturbed, vanished)
        return result


def _load_clip(spec: ClipSpec) -> ClipModel:
    """``load_clip``, its RuntimeErrors (e.g. weights not downloadable offline) as ``ModelLoadError``."""
    try:
        return load_clip(spec)
    except RuntimeError as e:
        raise ModelLoadError(f"CLIP --clip-model {spec.model} --clip-pretrained {spec.pretrained} could not be "
                             f"loaded: {e}") from e


def check_generations(path: str, benchmark: str, samples: list[BenchmarkSample], fingerprint: str,
                      sha256: str | None = None) -> dict:
    """The ``generation.json`` of a generations folder made from this benchmark with one image per sample.

    ValueError (one line, naming the folder) when it was made from another benchmark, when benchmark samples have
    no image or it holds images of keys the benchmark lacks (a few of each named), or when image files are missing.
    Folders written before the fingerprint existed are matched by the sha256 of benchmark.json instead.
    """
    info = read_generations(path)
    recorded = info.get("benchmark", {})
    same = (recorded.get("fingerprint") == fingerprint if "fingerprint" in recorded
            else sha256 is not None and recorded.get("sha256") == sha256)
    if not same:
        raise ValueError(f"--generations {path!r} was made from another benchmark than --benchmark {benchmark!r} "
                         "(benchmark fingerprints differ)")
    images = info.get("images") or {}
    keys = {s.key for s in samples}
    missing, extra = keys - set(images), set(images) - keys
    problems = []
    if missing:
        problems.append(f"benchmark samples without an image: {len(missing)} of {len(keys)} ({a_few(missing)})")
    if extra:
        problems.append(f"images of keys not in the benchmark: {len(extra)} ({a_few(extra)})")
    if problems:
        raise ValueError(f"--generations {path!r} does not match --benchmark {benchmark!r}: {'; '.join(problems)}")
    outside = [images[key] for key in sorted(keys) if leaves(path, images[key])]
    if outside:  # e.g. "../reference/images/k.png": another folder's image would be scored as this method's
        raise ValueError(f"--generations {path!r}: {INFO} lists images outside the folder: {len(outside)} "
                         f"({a_few(outside)}); paths must be relative and stay inside it")
    absent = [images[key] for key in sorted(keys) if not os.path.isfile(os.path.join(path, images[key]))]
    if absent:
        raise ValueError(f"--generations {path!r}: image files listed in {INFO} but missing: {len(absent)} "
                         f"({a_few(absent)})")
    wrong = []
    for sample in samples:
        name = images[sample.key]
        try:
            # the header, then the file's integrity (a PNG's CRCs: a truncated file fails here, before any folder
            # is scored)
            with Image.open(os.path.join(path, name), formats=OPEN_IMAGE_FORMATS) as picture:
                size = picture.size
                picture.verify()
        except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ValueError(f"--generations {path!r}: {name} (sample {sample.key!r}) is not a readable image: "
                             f"{exc}") from exc
        if size != sample.reference.shape[1::-1]:
            wrong.append(name)
    if wrong:
        raise ValueError(f"--generations {path!r}: images not at their reference's size: {len(wrong)} "
                         f"({a_few(wrong)})")
    unlisted = unlisted_images(path, images.values())
    if unlisted:
        logger.warning("--generations %s: %d image file(s) beside the listed ones are not in %s and are not scored "
                       "(%s): a mixed or partly overwritten folder?", path, len(unlisted), INFO, a_few(unlisted))
    return info


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def unlisted_images(path: str, listed: Iterable[str]) -> list[str]:
    """Image files in the folders of a generations folder's listed images that its generation.json does not list
    (relative paths, sorted)."""
    listed = {os.path.normpath(name) for name in listed}
    found = set()
    for folder in {os.path.dirname(name) for name in listed}:
        with os.scandir(os.path.join(path, folder)) as entries:
            found.update(os.path.normpath(os.path.join(folder, e.name)) for e in entries
                         if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES))
    return sorted(found - listed)


def _read_image(path: str, sample: BenchmarkSample) -> np.ndarray:
    """One generated RGB image, checked against the sample's reference size."""
    if not os.path.isfile(path):
        raise ValueError(f"generations: {path!r} (sample {sample.key!r}) is missing")
    try:
        with Image.open(path, formats=OPEN_IMAGE_FORMATS) as picture:
            image = np.array(picture.convert("RGB"))
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:  # damaged after the check, or a JPEG's data
        raise ValueError(f"generations: {path!r} (sample {sample.key!r}) is not a readable image: {exc}") from exc
    if image.shape != sample.reference.shape:
        raise ValueError(f"{path}: size {image.shape[:2]} differs from the reference's {sample.reference.shape[:2]}")
    return image


def _brief(info: dict) -> dict:
    """generation.json without its image list."""
    return {k: v for k, v in info.items() if k != "images"}


def _per_sample(samples: list[BenchmarkSample], groups: dict) -> dict:
    """Per-sample values by key (lists for per-region metrics)."""
    out = {}
    for j, sample in enumerate(samples):
        out[sample.key] = {name: None if value is None else [float(x) for x in value[j]]
                           for name, value in groups.items()}
    return out


def _sensitivity(base: dict, perturbed: dict, vanished: int) -> dict:
    """Perturbed summaries and their deltas against the unperturbed ones."""
    out = {"vanished_regions": vanished}
    for name, value in perturbed.items():
        before = base.get(name)
        delta = None
        if value is not None and before is not None and value["mean"] is not None and before["mean"] is not None:
            delta = value["mean"] - before["mean"]
        out[name] = {"perturbed": value, "delta": delta}
    return out


def unique_labels(rows: list[dict]) -> None:
    """Rows that share a label (two runs of one method, e.g. other seeds or settings) get their folder's name appended,
    `ntlb [ntlb0]`, so that tables and charts tell them apart (a chart drew one bar over the other); in place."""
    counts = Counter(row["label"] for row in rows)
    for row in rows:
        if counts[row["label"]] > 1:
            row["label"] = f"{row['label']} [{os.path.basename(row['generations'].rstrip(os.sep))}]"
    counts = Counter(row["label"] for row in rows)
    for number, row in enumerate(rows, start=1):  # folders of one name under different parents: number them
        if counts[row["label"]] > 1:
            row["label"] = f"{row['label']} #{number}"


def score(spec: ScoreSpec) -> dict:
    """Score every generations folder and write the report; return the report's content."""
    from spatext.eval.report import write_report

    bench_info = read_benchmark_info(spec.benchmark)
    samples = load_benchmark(spec.benchmark)
    if not samples:
        raise ValueError(f"--benchmark {spec.benchmark!r} holds no samples")
    _check_report_out(spec)
    fingerprint = benchmark_fingerprint(spec.benchmark)
    sha256 = file_sha256(os.path.join(spec.benchmark, INFO_FILE))
    infos = [check_generations(path, spec.benchmark, samples, fingerprint, sha256) for path in spec.generations]
    scorer = Scorer(spec, samples)  # loads the models: only once every folder has passed its checks
    rows = [scorer.score_folder(path, info)
            for path, info in tqdm(zip(spec.generations, infos, strict=True), desc="score", unit="method",
                                   total=len(infos))]
    unique_labels(rows)
    clip_label = f"{spec.clip.model} / {scorer.clip.pretrained_label}"
    result = {
        "benchmark": {"path": os.path.abspath(spec.benchmark), "protocol": bench_info.get("protocol"),
                      "num_samples": len(samples)},
        "settings": {"clip": clip_label, "segmenter": {"name": spec.segmenter.name,
                                                       "weights": scorer.segmenter.weights_label},
                     "bootstrap": spec.bootstrap, "seed": spec.seed,
                     "interval": ("none (--bootstrap 0): means only" if spec.bootstrap == 0 else
                                  "95% percentile bootstrap over samples") + "; FID: point value, no interval",
                     "mask_perturb": None if spec.mask_perturb is None else str(spec.mask_perturb)},
        "random_weights": [name for name, label in (("clip", scorer.clip.pretrained_label),
                                                    ("segmenter", scorer.segmenter.weights_label))
                           if label == RANDOM_INIT_LABEL]
        + [f"generations {row['label']}" for row in rows
           if "random init" in str(row["generation"].get("model", {}).get("weights"))],
        "unknown_provenance": [f"generations {row['label']}" for row in rows
                               if provenance_unknown(row["generation"].get("model", {}).get("weights"))],
        "fid": {k: v for k, v in scorer.fid_description.items()},
        "methods": rows,
    }
    write_report(result, spec.out, samples, spec.grid_samples)
    return result


def _check_report_out(spec: ScoreSpec) -> None:
    """ValueError when ``--out`` is or lies inside the benchmark folder or a generations folder (the report would
    mix into it, and a later ``generate --overwrite`` or ``make-benchmark --overwrite`` would delete it)."""
    for flag, path in (("--benchmark", spec.benchmark), *(("--generations", g) for g in spec.generations)):
        if os.path.exists(path) and is_same_or_inside(spec.out, path):
            raise ValueError(f"--out {spec.out!r} is or lies inside the {flag} folder {path!r}; write the report to "
                             "a folder of its own")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``spatext eval score`` (``--mask-perturb`` is added by the CLI)."""
    parser.add_argument("--benchmark", required=True, help="the benchmark folder the generations were made from")
    parser.add_argument("--generations", required=True, nargs="+", help="generations folders (one report row each)")
    parser.add_argument("--out", required=True, help="report folder (report.md, report.json, report.csv, PNGs)")
    parser.add_argument("--segmenter", default="annotations",
                        help="Local IoU segmenter: annotations (ground truth; reference only) or mask2former, ...")
    parser.add_argument("--segmenter-weights", default=None, help="segmenter weights (hub name / dir; 'none' = random)")
    parser.add_argument("--segmenter-config", default=None, help="segmenter architecture config for random init")
    parser.add_argument("--segmenter-threshold", type=float, default=0.8, help="panoptic score threshold")
    parser.add_argument("--segmenter-mask-threshold", type=float, default=0.5, help="mask binarisation threshold")
    parser.add_argument("--segmenter-overlap-threshold", type=float, default=0.8, help="segment overlap threshold")
    parser.add_argument("--segmenter-size", type=int, default=None, help="shortest edge fed to the segmenter")
    parser.add_argument("--clip-model", default="ViT-L-14", help="open_clip architecture for the CLIP distances")
    parser.add_argument("--clip-pretrained", default="openai", help="open_clip tag, checkpoint file, or 'none'")
    parser.add_argument("--fid-extractor", choices=EXTRACTORS, default="inception", help="FID features")
    parser.add_argument("--inception-weights", default=None, help="local FID Inception weights file")
    parser.add_argument("--fid-antialias", action="store_true",
                        help="resize for Inception with torchmetrics' antialiased bilinear instead of the standard "
                             "TF1 bilinear (the FID is then marked not comparable with published FIDs)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help=f"bootstrap resamples for the 95%% intervals (>= {MIN_BOOTSTRAP}; 0 = means only)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--grid-samples", type=int, default=4, help="samples (rows) in the image grid")
    parser.add_argument("--device", default="cpu", help="torch device of CLIP and the segmenter")


def spec_from_args(args: argparse.Namespace) -> ScoreSpec:
    """The ``ScoreSpec`` of parsed ``score`` flags."""
    segmenter = SegmenterSpec(name=args.segmenter, weights=args.segmenter_weights, config=args.segmenter_config,
                              threshold=args.segmenter_threshold, mask_threshold=args.segmenter_mask_threshold,
                              overlap_threshold=args.segmenter_overlap_threshold,
                              processor_size=args.segmenter_size, device=args.device)
    return ScoreSpec(benchmark=args.benchmark, generations=tuple(args.generations), out=args.out,
                     segmenter=segmenter, clip=ClipSpec(model=args.clip_model, pretrained=args.clip_pretrained,
                                                        device=args.device),
                     fid_extractor=args.fid_extractor, inception_weights=args.inception_weights,
                     fid_antialias=args.fid_antialias,
                     mask_perturb=getattr(args, "mask_perturb", None), bootstrap=args.bootstrap, seed=args.seed,
                     grid_samples=args.grid_samples)
