"""The ``mask2former`` segmenter: transformers' Mask2Former (universal segmentation) in panoptic mode.

Pre- and post-processing run on the model's device (see ``Mask2FormerSegmenter``). Weights load the normal way
(``from_pretrained`` of a hub name or a local directory, never remote code). The literal weights ``none`` builds a
randomly initialised model from a config (for tests and the offline demo); it is seeded, so every worker builds the
same random model, and it is never silent: the log and ``weights_label`` say ``none (random init)``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import huggingface_hub
import numpy as np
import torch
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

from spatext.pipeline.records import Sample, Segment, Segmentation
from spatext.pipeline.segmenters.base import DEFAULT_WEIGHTS as BACKEND_DEFAULTS
from spatext.pipeline.segmenters.base import (
    RANDOM_INIT_LABEL,
    Segmenter,
    SegmenterSpec,
    autocast,
    clean_segmentation,
)
from spatext.pipeline.segmenters.panoptic_merge import PanopticResult, panoptic_merge, valid_fractions
from spatext.pipeline.segmenters.shape_groups import MIN_PASS_PIXELS, processed_shape, shape_groups, shape_step

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = BACKEND_DEFAULTS["mask2former"]
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # packaged configs, e.g. mask2former-tiny.json
RANDOM_INIT_SEED = 0  # random init is a pure function of the config: identical on every worker
_DEFAULT_SHORT, _DEFAULT_LONG = 800, 1333  # the image processor's default size; processor_size keeps this ratio


def resolve_config_path(config: str) -> Path:
    """A config path as given, or the name of a packaged config (``mask2former-tiny`` or ``mask2former-tiny.json``)."""
    path = Path(config)
    if path.is_file():
        return path
    packaged = CONFIG_DIR / (config if config.endswith(".json") else f"{config}.json")
    if packaged.is_file():
        return packaged
    choices = sorted(p.stem for p in CONFIG_DIR.glob("mask2former*.json"))
    raise ValueError(f"--segmenter-config {config!r} is neither a file nor a packaged config ({', '.join(choices)})")


def load_config(config: str | None) -> Mask2FormerConfig:
    """``Mask2FormerConfig(**json)`` for a config file or packaged name; the default config for None."""
    if config is None:
        return Mask2FormerConfig()
    with open(resolve_config_path(config), encoding="utf-8") as f:
        kwargs = json.load(f)
    return Mask2FormerConfig(**kwargs)


def _size_kwargs(processor_size: int | None) -> dict[str, Any]:
    """Image-processor ``size`` override for a shortest edge (longest edge keeps the default 800:1333 ratio)."""
    if processor_size is None:
        return {}
    longest = max(processor_size, round(processor_size * _DEFAULT_LONG / _DEFAULT_SHORT))
    return {"size": {"shortest_edge": processor_size, "longest_edge": longest}}


def _random_init(spec: SegmenterSpec) -> tuple[Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor]:
    """A seeded, randomly initialised model from ``spec.config`` and a processor with default settings."""
    config = load_config(spec.config)
    logger.warning(
        "mask2former pretrained: %s; config %s; its segments are meaningless except for tests and demos",
        RANDOM_INIT_LABEL,
        spec.config or "Mask2FormerConfig() defaults",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = Mask2FormerForUniversalSegmentation(config)
    return model, Mask2FormerImageProcessor(**_size_kwargs(spec.processor_size))


def check_weights(weights: str | None) -> None:
    """Launcher-side check of --segmenter-weights, before any output is written (a worker would fail later, on
    Dataflow after GPU workers started): OSError for a local directory without config.json, a local-looking path
    that does not exist, or a hub name that is not cached while the hub is offline (HF_HUB_OFFLINE: a cache
    lookup, no download; online, the workers fetch the weights themselves). ``none`` (random init) passes."""
    weights = weights or DEFAULT_WEIGHTS
    if weights.strip().lower() == "none":
        return
    hint = "pass --segmenter-weights <local directory> or --segmenter-weights none (random init, for tests only)"
    if os.path.isdir(weights):
        if not os.path.isfile(os.path.join(weights, "config.json")):
            raise OSError(f"--segmenter-weights {weights!r} is a directory without config.json (a save_pretrained "
                          f"folder of Mask2Former is expected); {hint}")
        return
    if weights.startswith(("/", "./", "../", "~")) or os.sep + os.sep in weights:
        raise OSError(f"--segmenter-weights {weights!r}: no such directory; {hint}")
    if huggingface_hub.constants.HF_HUB_OFFLINE and not isinstance(
        huggingface_hub.try_to_load_from_cache(weights, "config.json"), str
    ):
        raise OSError(f"cannot load Mask2Former weights {weights!r} (--segmenter-weights): not in the Hugging Face "
                      f"cache and the hub is offline (HF_HUB_OFFLINE); {hint}")


def _pretrained(weights: str, spec: SegmenterSpec) -> tuple[Mask2FormerForUniversalSegmentation, Any]:
    """Model and processor ``from_pretrained(weights)``; a clear error when they are neither local nor reachable."""
    try:
        processor = Mask2FormerImageProcessor.from_pretrained(weights, **_size_kwargs(spec.processor_size))
        model = Mask2FormerForUniversalSegmentation.from_pretrained(weights, trust_remote_code=False)
    except pickle.UnpicklingError as exc:  # torch's weights_only load refused a pickled object: never run it
        raise ValueError(f"--segmenter-weights {weights!r}: its weights file holds pickled objects that a safe "
                         f"(weights_only) load refuses; use safetensors weights. Cause: {str(exc).splitlines()[0]}"
                         ) from exc
    except (OSError, ValueError) as exc:
        raise OSError(
            f"cannot load Mask2Former weights {weights!r} (--segmenter-weights): not a local directory with "
            "config.json + weights + preprocessor_config.json, and not in the Hugging Face cache or downloadable "
            "(offline?). Pass --segmenter-weights <local directory> or --segmenter-weights none "
            f"(random init, for tests only). Cause: {exc}"
        ) from exc
    logger.info("mask2former pretrained: %s", weights)
    return model, processor


class Mask2FormerSegmenter(Segmenter):
    """Panoptic segmentation with ``Mask2FormerForUniversalSegmentation``, batched over the given images.

    ``segment`` = per group of similar shapes (``pass_groups``, which keeps padding low): ``preprocess`` (the
    processor's torchvision path on ``spec.device``) -> ``forward`` -> ``postprocess`` (``panoptic_merge``:
    transformers' panoptic post-processing, batched on the device); only uint8 images go to the device and only
    int32 id maps and segment lists come back.
    """

    name = "mask2former"
    min_pass_pixels = MIN_PASS_PIXELS
    pass_grid: int | None = None  # passes padded to multiples of this (rounded up to the processor's size divisor)

    def __init__(self, spec: SegmenterSpec) -> None:
        """Load the model and processor that ``spec.weights`` names, in eval mode on ``spec.device``."""
        self.spec = spec
        weights = spec.weights or DEFAULT_WEIGHTS
        if weights.strip().lower() == "none":
            model, self.processor = _random_init(spec)
            self.weights_label = RANDOM_INIT_LABEL
        else:
            model, self.processor = _pretrained(weights, spec)
            self.weights_label = weights
        self.device = torch.device(spec.device)
        self.model = model.to(self.device).eval()
        self.id2label = {int(k): str(v) for k, v in self.model.config.id2label.items()}

    @torch.inference_mode()
    def segment(self, samples: Sequence[Sample]) -> list[Segmentation]:
        """Per group of similar shapes (``pass_groups``): preprocess on the device, one forward pass, then the
        panoptic merge on the device; the results in the samples' order."""
        results: list[Segmentation | None] = [None] * len(samples)
        for group in self.pass_groups(samples):
            part = [samples[i] for i in group]
            inputs, sizes = self.preprocess(part)
            outputs = self.forward(inputs)
            for i, result in zip(group, self.postprocess(outputs, sizes, valid_fractions(inputs["pixel_mask"])),
                                 strict=True):
                results[i] = result
        return results

    def pass_groups(self, samples: Sequence[Sample]) -> list[list[int]]:
        """The samples' indices in forward passes of similar processed shapes (``shape_groups``: the pixels run,
        padding to the ``shape_step`` grid included, with a floor of ``min_pass_pixels`` per pass, are the fewest).
        One pass where the processor does not resize by a shortest edge (a fixed height and width, a maximum height
        and width, no resizing) or pads every batch to one fixed size: there the shapes this predicts are not the
        ones it makes."""
        rule = self._shortest_edge_rule()
        if not samples or rule is None:
            return [list(range(len(samples)))] if samples else []
        shortest, longest, _ = rule
        step = self._grid(rule)
        shapes = [processed_shape(*s.image.shape[:2], shortest, longest, step) for s in samples]
        return shape_groups(shapes, min_pass_pixels=self.min_pass_pixels)

    def _grid(self, rule: tuple[int, int | None, int]) -> int:
        """The pass padding grid in px: ``pass_grid`` rounded up to a multiple of the processor's size divisor (the
        processor rounds to that first), else ``shape_step`` of the processor's shortest edge."""
        divisor = max(rule[2], 1)
        return -(-self.pass_grid // divisor) * divisor if self.pass_grid else shape_step(rule[0], divisor)

    def _shortest_edge_rule(self) -> tuple[int, int | None, int] | None:
        """(shortest edge, longest edge or None, size divisor) where the processor scales images by a shortest edge
        and pads to the batch's largest size; None where it resizes otherwise or pads to a fixed size."""
        processor = self.processor
        size = processor.size
        shortest, longest = (getattr(size, name, None) or (size.get(name) if isinstance(size, dict) else None)
                             for name in ("shortest_edge", "longest_edge"))
        if not shortest or not getattr(processor, "do_resize", True) or getattr(processor, "pad_size", None):
            return None
        return shortest, longest, getattr(processor, "size_divisor", None) or 1

    @torch.inference_mode()
    def preprocess(self, samples: Sequence[Sample]) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
        """Model inputs (``pixel_values``, ``pixel_mask``) on the device and each image's (height, width).

        The processor's own torchvision path does the work (resize to its shortest/longest edge, rescale, normalise,
        pad to the batch maximum) on ``self.device``: only the uint8 images cross to the device. On cuda its
        antialiased bilinear resize runs in float32 and rounds to uint8, where the CPU has a native uint8 kernel: the
        two differ by at most one grey level before normalisation (tested on the CPU's float path).
        """
        images = [np.ascontiguousarray(s.image) for s in samples]
        for sample, image in zip(samples, images, strict=True):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"sample {sample.key!r}: image must be uint8 H x W x 3, got {image.dtype} of shape {image.shape}"
                )
        inputs = self.processor(
            images=images, return_tensors="pt", input_data_format="channels_last", device=self.device
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        rule = self._shortest_edge_rule()
        if rule is not None:  # pad on to the shape_step grid (bottom and right, as the processor pads): fewer shapes
            step = self._grid(rule)
            height, width = inputs["pixel_values"].shape[-2:]
            extra = (0, -width % step, 0, -height % step)
            if any(extra):
                inputs = {k: torch.nn.functional.pad(v, extra) if k in ("pixel_values", "pixel_mask") else v
                          for k, v in inputs.items()}
        return inputs, [image.shape[:2] for image in images]

    @torch.inference_mode()
    def forward(self, inputs: dict[str, torch.Tensor]) -> Any:
        """The model's forward pass under the spec's autocast (its output keeps the logits on the device)."""
        with autocast(self.spec):
            return self.model(**inputs)

    @torch.inference_mode()
    def postprocess(
        self,
        outputs: Any,
        sizes: Sequence[tuple[int, int]],
        image_fractions: Sequence[tuple[float, float]] | None = None,
    ) -> list[Segmentation]:
        """transformers' panoptic post-processing (no fusing), batched on the device; one Segmentation per image.

        ``image_fractions`` (``valid_fractions`` of the inputs' ``pixel_mask``) cut each image's batch padding off
        the mask logits first, as the original Mask2Former does and transformers does not: otherwise an image's
        segments shift with the sizes of the other images in its batch (see ``panoptic_merge``). The logits are
        merged in float32 even when the forward ran in bf16 / fp16: the merge's argmax over score-weighted
        probabilities would otherwise tie often. On float32 logits of unpadded images the result equals
        ``Mask2FormerImageProcessor.post_process_panoptic_segmentation`` (tests/test_panoptic_merge.py).
        """
        results = panoptic_merge(
            outputs.class_queries_logits.float(),
            outputs.masks_queries_logits.float(),
            target_sizes=sizes,
            threshold=self.spec.threshold,
            mask_threshold=self.spec.mask_threshold,
            overlap_threshold=self.spec.overlap_threshold,
            image_fractions=image_fractions,
        )
        return [self._to_segmentation(result, size) for result, size in zip(results, sizes, strict=True)]

    def _to_segmentation(self, result: PanopticResult, size: tuple[int, int]) -> Segmentation:
        """Convert one merged result: void (-1 or 0) -> 0, ids from 1, labels from the model's id2label."""
        segments = [
            Segment(id=seg.id, label=self.id2label.get(seg.label_id, str(seg.label_id)), score=seg.score)
            for seg in result.segments
        ]
        # the merge's segments are exactly the positive ids of its map (tests/test_panoptic_merge.py): no recount
        return clean_segmentation(result.id_map.numpy(), segments, shape=size, present=[s.id for s in segments])
