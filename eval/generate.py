"""``spatext eval generate``: one image per benchmark sample, by one method, into a generations folder.

    spatext eval generate --benchmark bench/coco-few --method concat --base-model SD_DIR --out gen/concat
    spatext eval generate --benchmark bench/coco-few --method spatext --run runs/sd15 --out gen/spatext

Methods: ``reference`` (the benchmark's real images: an upper bound for the local metrics), ``global-only``,
``concat`` and ``ntlb`` (training-free baselines on ``--base-model``, see ``eval/baselines.py``) and ``spatext``
(a trained run: ``RUN/pipeline`` loaded with ``SpaTextPipeline.from_pretrained``; the scene is the sample's masks
with its local prompts).

The folder (``--out``)::

    DIR/images/STEM.png     one RGB PNG per benchmark sample (STEM as in the benchmark, ``file_stem(key)``), at the
                            sample's reference size: generated at the model's size (or --height/--width), then
                            resized (bicubic) to the reference size
    DIR/generation.json     written last: format + version, method, benchmark (path, sha256 of its benchmark.json,
                            its fingerprint ``benchmark_fingerprint``, sample count), model (run / base model, weights
                            label), seed, steps, guidance, ntlb settings, generation and output sizes, the concat rule,
                            image paths by key, versions, time

Weights label of a baseline: ``--weights-label`` when given, else the base model's ``spatext_weights.json`` (written by
``spatext tiny-base-model``: "none (random init)"), else "provenance not given". ``--overwrite`` replaces only a
generations folder (``generation.json`` + ``images/``, or an interrupted run's ``images/`` of PNGs), never a folder
that is or holds the benchmark, the run or the base model.

Seeds: each sample gets its own ``torch.Generator`` seeded by sha256(seed, key), so an image does not depend on the
order or the subset of samples generated.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from spatext.eval.baselines import (
    SampleSettings,
    concat_prompt,
    fit_prompt,
    load_base_pipeline,
    model_size,
    sample_ntlb,
    sample_text,
)
from spatext.eval.benchmark_set import (
    INFO_FILE,
    BenchmarkSample,
    benchmark_fingerprint,
    file_stem,
    load_benchmark,
    read_benchmark_info,
)
from spatext.eval.masks import MaskPerturbation, perturb_masks, region_indices
from spatext.eval.outputs import a_few, only_files_with_suffix, read_info, refuse_inputs, to_uint8
from spatext.model.tiny_base import WEIGHTS_MARKER, read_weights_marker
from spatext.pipeline.weights import file_sha256
from spatext.versions import package_versions

logger = logging.getLogger(__name__)
IMAGE_PACKAGES = ("torch", "diffusers", "transformers", "spatext")  # the libraries that shape the images

FORMAT = "spatext-generations"
FORMAT_VERSION = 1
INFO = "generation.json"
IMAGES_DIR = "images"
METHODS = ("reference", "global-only", "concat", "ntlb", "spatext")
BASE_METHODS = ("global-only", "concat", "ntlb")
CONCAT_RULE = 'global + ", " + ", ".join(local prompts); global shortened from its end to fit the token limit'
Generator = Callable[[BenchmarkSample, torch.Generator], np.ndarray]


@dataclass(frozen=True)
class GenerateSpec:
    """What ``generate`` does (one config object; the CLI flags map to its fields)."""

    benchmark: str
    method: str
    out: str
    run: str | None = None
    base_model: str | None = None
    weights_label: str | None = None
    seed: int = 0
    settings: SampleSettings = SampleSettings()
    device: str = "cpu"
    overwrite: bool = False
    mask_perturb: MaskPerturbation | None = None  # generate from perturbed masks (mask sensitivity of generation)

    def __post_init__(self) -> None:
        """Reject invalid settings with the flag that sets them."""
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r} is not valid; choose one of {', '.join(METHODS)}")
        if self.method == "spatext" and not self.run:
            raise ValueError("--method spatext needs --run RUN_DIR (a training run holding pipeline/)")
        if self.method in BASE_METHODS and not self.base_model:
            raise ValueError(f"--method {self.method} needs --base-model DIR (a Stable-Diffusion-like model)")
        if self.settings.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.settings.steps}")
        ntlb_steps = self.settings.ntlb_steps
        if (ntlb_steps is not None and ntlb_steps < 0) or self.settings.ntlb_iterations < 1:
            raise ValueError("--ntlb-steps must be >= 0 and --ntlb-iterations >= 1")
        if self.method == "ntlb" and ntlb_steps is not None and ntlb_steps >= self.settings.steps:
            logger.warning("--ntlb-steps %d >= --steps %d: every denoising step gets the latent optimisation (NTLB "
                           "optimises the first steps only; the default is half of --steps)", self.settings.ntlb_steps,
                           self.settings.steps)
        if self.mask_perturb is not None and self.method in ("global-only", "concat"):
            raise ValueError(f"--mask-perturb does not apply to --method {self.method}: it uses no masks (perturbing "
                             "would only drop the local prompts of regions that vanish)")


def sample_seed(seed: int, key: str) -> int:
    """A 63-bit seed from (seed, key): the same for a sample whatever the order of generation."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") >> 1


def sample_generator(seed: int, key: str, device: str = "cpu") -> torch.Generator:
    """The sample's own generator (seeded by ``sample_seed``)."""
    return torch.Generator(device=device).manual_seed(sample_seed(seed, key))


UNKNOWN_PROVENANCE = "provenance not given"  # in a weights label: nothing says whether these weights are real


def provenance_unknown(weights_label: object) -> bool:
    """Whether a generation's weights label says nothing about where its weights come from (reports warn of it)."""
    return UNKNOWN_PROVENANCE in str(weights_label)


def _run_label(run: str) -> dict:
    """What a training run says about its weights (run.json lineage), when it has one."""
    path = os.path.join(run, "run.json")
    if not os.path.isfile(path):
        return {"weights": f"unknown (no run.json: {UNKNOWN_PROVENANCE})"}
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    lineage = data.get("lineage", {})
    random_init = lineage.get("random_init") or []
    return {"lineage": lineage, "weights": f"random init: {', '.join(random_init)}" if random_init else "trained"}


def _spatext_generator(spec: GenerateSpec) -> tuple[Generator, dict]:
    """A per-sample function for ``spatext`` and what to record about the model."""
    from spatext.model.sample import load_run  # its checks name --run: a folder without a pipeline, a base model
    from spatext.model.scene import Scene

    pipe = load_run(spec.run, spec.device)
    pipe.set_progress_bar_config(disable=True)
    height = spec.settings.height or pipe.default_size[0]
    width = spec.settings.width or pipe.default_size[1]

    dropped: dict[str, list[int]] = {}

    def one(sample: BenchmarkSample, generator: torch.Generator) -> np.ndarray:
        """Generate one sample's image through the SpaText pipeline. A region with no pixel at the denoiser's
        resolution (smaller than a latent cell: common in the `all` protocol) cannot condition it: it is left out of
        the scene, recorded in ``dropped`` (generation.json: ``regions_dropped``), and scored like every region."""
        regions = [(sample.masks == r.index, r.prompt) for r in sample.regions]
        visible = pipe.visible_regions(Scene(sample.prompt, regions), (height, width))
        if not all(visible):
            dropped[sample.key] = [r.index for r, kept in zip(sample.regions, visible, strict=True) if not kept]
        scene = Scene(sample.prompt, [region for region, kept in zip(regions, visible, strict=True) if kept])
        out = pipe(sample.prompt, scene=scene, height=height, width=width, generator=generator, output_type="np",
                   num_inference_steps=spec.settings.steps, guidance_scale=spec.settings.guidance)
        return to_uint8(out.images[0])

    model = {"run": spec.run, "pipeline": os.path.join(spec.run, "pipeline"), **_run_label(spec.run)}
    if spec.weights_label:
        model["weights"] = spec.weights_label
    return one, {**model, "generated_size": [height, width], "regions_dropped": dropped}


def _base_generator(spec: GenerateSpec) -> tuple[Generator, dict]:
    """A per-sample function for a base-model baseline and what to record about the model."""
    pipe = load_base_pipeline(spec.base_model, spec.device)
    settings = spec.settings

    def one(sample: BenchmarkSample, generator: torch.Generator) -> np.ndarray:
        """Generate one sample's image with the baseline."""
        if spec.method == "global-only":
            return sample_text(pipe, sample.prompt, settings, generator)
        if spec.method == "concat":
            fitted = fit_prompt(pipe.tokenizer, sample.prompt, sample.local_prompts)
            return sample_text(pipe, concat_prompt(fitted, sample.local_prompts), settings, generator)
        image, losses = sample_ntlb(pipe, sample.prompt, sample.masks, sample.local_prompts, settings, generator)
        logger.debug("ntlb %s: attention loss %s", sample.key, losses)
        return image

    size = model_size(pipe)
    weights, marker = base_weights_label(spec.base_model, spec.weights_label)
    model = {"base_model": spec.base_model, "weights": weights, "weights_marker": marker,
             "generated_size": [settings.height or size[0], settings.width or size[1]]}
    return one, model


def base_weights_label(base_model: str, weights_label: str | None) -> tuple[str, dict | None]:
    """The weights label of a base model and its ``spatext_weights.json`` record (None when it has none).

    Random weights are never silent (DESIGN.md): the tiny base model says so in its marker file, and the label
    carries it into generation.json and the report. An explicit ``--weights-label`` wins (e.g. for a folder that was
    trained after the marker was written), with a warning when it contradicts the marker.
    """
    marker = read_weights_marker(base_model)
    if weights_label:
        if marker and marker["pretrained"] not in weights_label:
            logger.warning("--weights-label %r overrides %s of --base-model %s, which says pretrained: %s",
                           weights_label, WEIGHTS_MARKER, base_model, marker["pretrained"])
        return weights_label, marker
    if marker:
        logger.warning("--base-model %s: pretrained: %s (%s)", base_model, marker["pretrained"], WEIGHTS_MARKER)
        return marker["pretrained"], marker
    return f"as loaded from --base-model {base_model} ({UNKNOWN_PROVENANCE})", None


def perturb_sample(sample: BenchmarkSample, perturb: MaskPerturbation) -> tuple[BenchmarkSample, int]:
    """The sample with perturbed masks (vanished regions dropped, the rest renumbered 1..K') and the vanished count."""
    moved = perturb_masks(sample.masks, perturb)
    kept = region_indices(moved)
    masks = np.zeros_like(moved)
    for new, old in enumerate(kept, start=1):
        masks[moved == old] = new
    regions = tuple(replace(sample.regions[old - 1], index=new) for new, old in enumerate(kept, start=1))
    return replace(sample, masks=masks, regions=regions), len(sample.regions) - len(kept)


def _check_replaceable(spec: GenerateSpec) -> None:
    """ValueError unless the non-empty ``--out`` is a generations folder that ``--overwrite`` may replace.

    ``--overwrite`` deletes, so it takes only what ``generate`` writes: ``generation.json`` (of this format) and
    ``images/`` — or ``images/`` of PNGs alone (a run interrupted before ``generation.json``) — and never a folder
    that is or holds an input (the benchmark, the run, the base model).
    """
    refuse_inputs("--out", spec.out, {"--benchmark": spec.benchmark, "--run": spec.run,
                                      "--base-model": spec.base_model})
    entries = set(os.listdir(spec.out))
    images = os.path.join(spec.out, IMAGES_DIR)
    images_ok = IMAGES_DIR not in entries or (
        os.path.isdir(images) and not os.path.islink(images) and only_files_with_suffix(images, (".png",)))
    if not entries <= {INFO, IMAGES_DIR} or not images_ok:
        raise ValueError(f"--out {spec.out!r} holds entries that generate does not write ({a_few(entries)}); "
                         "refusing to --overwrite it: choose an empty or new folder")
    if INFO in entries:
        try:
            read_generations(spec.out, "--out")
        except ValueError as e:  # json.JSONDecodeError included
            raise ValueError(f"--out {spec.out!r} is not a generations folder ({e}); refusing to --overwrite it") from e


def _check_out(spec: GenerateSpec) -> bool:
    """Whether ``--out`` holds a generations folder to replace; ValueError when it may not be replaced."""
    if not (os.path.isdir(spec.out) and os.listdir(spec.out)):
        return False
    if not spec.overwrite:
        raise ValueError(f"--out {spec.out!r} is not empty; pass --overwrite to replace it")
    _check_replaceable(spec)
    return True


def _prepare_out(spec: GenerateSpec) -> None:
    """Create the output folder; replace a non-empty one only with ``overwrite`` and only if generate made it."""
    if _check_out(spec):
        info, images = os.path.join(spec.out, INFO), os.path.join(spec.out, IMAGES_DIR)
        if os.path.isfile(info):
            os.remove(info)  # first: from here on the folder reads as incomplete
        if os.path.isdir(images):
            shutil.rmtree(images)
    os.makedirs(os.path.join(spec.out, IMAGES_DIR), exist_ok=True)


def _save(image: np.ndarray, size: tuple[int, int], path: str) -> None:
    """Resize (bicubic) an H x W x 3 uint8 image to ``size`` (height, width) when needed and save it as PNG."""
    picture = Image.fromarray(image)
    if image.shape[:2] != tuple(size):
        picture = picture.resize((size[1], size[0]), Image.BICUBIC)
    picture.save(path, format="PNG")


def generate(spec: GenerateSpec) -> dict:
    """Write one image per benchmark sample for ``spec.method`` and ``generation.json``; return the latter."""
    bench_info = read_benchmark_info(spec.benchmark)
    samples = load_benchmark(spec.benchmark)
    if spec.mask_perturb is not None and spec.method == "reference":
        raise ValueError("--mask-perturb does not apply to --method reference (the real images use no masks)")
    _check_out(spec)  # before loading a model; the folder is replaced only once the model has loaded
    if spec.method == "reference":
        one, model = (lambda sample, generator: sample.reference), {"weights": "real images (the benchmark's)"}
    elif spec.method == "spatext":
        one, model = _spatext_generator(spec)
    else:
        one, model = _base_generator(spec)
    _prepare_out(spec)
    images = {}
    for sample in tqdm(samples, desc=f"generate {spec.method}", unit="image"):
        path = f"{IMAGES_DIR}/{file_stem(sample.key)}.png"
        source = sample if spec.mask_perturb is None else perturb_sample(sample, spec.mask_perturb)[0]
        image = one(source, sample_generator(spec.seed, sample.key))
        _save(image, sample.reference.shape[:2], os.path.join(spec.out, path))
        images[sample.key] = path
    info = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "method": spec.method,
        "benchmark": {"path": os.path.abspath(spec.benchmark), "num_samples": len(samples),
                      "sha256": file_sha256(os.path.join(spec.benchmark, INFO_FILE)),
                      "fingerprint": benchmark_fingerprint(spec.benchmark),
                      "protocol": bench_info.get("protocol")},
        "mask_perturb": None if spec.mask_perturb is None else str(spec.mask_perturb),
        "model": model, "seed": spec.seed, "seeding": "torch.Generator per sample, sha256(seed:key)",
        "settings": None if spec.method == "reference" else asdict(spec.settings),  # reference samples nothing
        "device": spec.device,
        "concat_rule": CONCAT_RULE if spec.method in ("concat", "ntlb") else None,
        "resize": None if spec.method == "reference" else "PIL bicubic to each sample's reference size",
        "images": images, "versions": package_versions(IMAGE_PACKAGES),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(os.path.join(spec.out, INFO), "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2, sort_keys=True)
    dropped = model.get("regions_dropped") or {}
    if dropped:
        logger.warning("generate %s: %d region(s) of %d sample(s) have no pixel at the model's resolution and were "
                       "left out of their scenes (generation.json model.regions_dropped; scored all the same)",
                       spec.method, sum(len(v) for v in dropped.values()), len(dropped))
    logger.info("generate %s: %d images -> %s", spec.method, len(images), spec.out)
    return info


def read_generations(path: str, flag: str = "--generations") -> dict:
    """The ``generation.json`` of a generations folder given with ``flag`` (ValueError when missing or of another
    format)."""
    return read_info(path, INFO, FORMAT, FORMAT_VERSION, flag, "generations folder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``spatext eval generate``."""
    defaults = SampleSettings()
    parser.add_argument("--benchmark", required=True, help="a benchmark folder (spatext eval make-benchmark)")
    parser.add_argument("--method", required=True, choices=METHODS, help="what generates the images")
    parser.add_argument("--out", required=True, help="output generations folder")
    parser.add_argument("--run", dest="run_dir", default=None,
                        help="--method spatext: a training run folder holding pipeline/")
    parser.add_argument("--base-model", default=None, help="baselines: a Stable-Diffusion-like diffusers folder")
    parser.add_argument("--weights-label", default=None,
                        help="how to describe the model's weights in generation.json (e.g. 'none (random init)')")
    parser.add_argument("--seed", type=int, default=0, help="seed; each sample's generator is seeded by (seed, key)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=defaults.guidance, help="classifier-free guidance scale")
    parser.add_argument("--height", type=int, default=None, help="generation height (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="generation width (default: the model's)")
    parser.add_argument("--ntlb-steps", type=int, default=defaults.ntlb_steps,
                        help="ntlb: the first N denoising steps get the latent optimisation (default: half of --steps)")
    parser.add_argument("--ntlb-iterations", type=int, default=defaults.ntlb_iterations,
                        help="ntlb: gradient steps on the latents per optimised denoising step")
    parser.add_argument("--ntlb-step-size", type=float, default=defaults.ntlb_step_size,
                        help="ntlb: gradient step size on the latents")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def spec_from_args(args: argparse.Namespace) -> GenerateSpec:
    """The ``GenerateSpec`` of parsed ``generate`` flags."""
    settings = SampleSettings(steps=args.steps, guidance=args.guidance, height=args.height, width=args.width,
                              ntlb_steps=args.ntlb_steps, ntlb_iterations=args.ntlb_iterations,
                              ntlb_step_size=args.ntlb_step_size)
    return GenerateSpec(benchmark=args.benchmark, method=args.method, out=args.out, run=args.run_dir,
                        base_model=args.base_model, weights_label=args.weights_label, seed=args.seed,
                        settings=settings, device=args.device, overwrite=args.overwrite,
                        mask_perturb=getattr(args, "mask_perturb", None))
