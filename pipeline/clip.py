"""The CLIP wrapper: load an open_clip model and embed images, segment crops and texts.

``embed_images`` and ``embed_texts`` are the public building blocks (the eval package's Global / Local distance reuse
them); the pipeline's embed stage, ``embed.ClipEmbedder``, runs ``ClipModel.embed_samples``. Importing this module
registers the tiny test architectures with open_clip (``configs/open_clip/``): ``spatext-tiny`` (64-px input) and
``spatext-tiny-224`` (the same tiny model with ViT-sized 224-px input, so benchmarks time real-sized preprocessing next
to a negligible forward).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from .clip_preprocess import PixelTransform
from .crop import labeled_crop_array
from .records import Embeddings, Sample
from .torch_threads import apply_torch_threads
from .weights import read_state_dict

logger = logging.getLogger(__name__)

TINY_MODEL = "spatext-tiny"
CONFIG_DIR = Path(__file__).parent / "configs" / "open_clip"  # one JSON per architecture, named after the model
RANDOM_INIT = "none"
RANDOM_INIT_LABEL = "none (random init)"
PRECISIONS = ("fp32", "bf16", "fp16")
# wall and this thread's CPU milliseconds (torch's intra-op threads excluded: exact with one torch thread)
# what embed_samples reports of each call: where its time went, and the torch threads it ran on
TIMINGS = ("preprocess_ms", "preprocess_cpu_ms", "forward_ms", "forward_cpu_ms", "torch_threads")
MAX_IMAGES_PER_FORWARD = 256  # encode_image/encode_text chunk size (a batch of samples with their crops is split)


open_clip.add_model_config(CONFIG_DIR)  # registers "spatext-tiny" and "spatext-tiny-224" (configs/open_clip/*.json)
RANDOM_INIT_SEED = 0  # random weights are seeded: every worker, every run builds the same model


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP to load and how to run it (one config object for the embed stage)."""

    model: str = "ViT-L-14"  # an open_clip architecture name (open_clip.list_models()), or "spatext-tiny"
    pretrained: str = "openai"  # an open_clip tag, a local checkpoint file (.safetensors / .pt / .bin), or "none"
    device: str = "cpu"
    batch_size: int = 16  # samples per RunInference batch
    precision: str = "fp32"  # fp32 | bf16 | fp16 (half-precision weights, on cuda only)

    def __post_init__(self) -> None:
        """Reject invalid settings with the flag that sets them."""
        if self.batch_size < 1:
            raise ValueError(f"--clip-batch-size must be >= 1, got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass(frozen=True)
class ClipModel:
    """A loaded CLIP: the model in eval mode, its eval image transform, its tokenizer and what was loaded."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    embed_dim: int
    pretrained_label: str  # the tag or checkpoint path, or exactly "none (random init)"
    spec: ClipSpec
    pixel_transform: PixelTransform | None = None  # ``preprocess`` on uint8 tensors; None: use the PIL path
    # One batch at a time on the device when threads share the model (see segment.SerialSegmenter for why).
    device_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, init=False, repr=False,
                                                    compare=False)
    # torch intra-op threads set on the calling thread of each embed_samples (None: leave them): the embed stage's
    # (see pipeline/torch_threads.py; a model server's threads may start after a worker set its own)
    torch_threads: int | None = None

    def __deepcopy__(self, memo: dict) -> ClipModel:
        """Itself: a loaded model is read-only inference state, shared rather than copied, so that copies of what
        holds it (torchmetrics' ``clone``, ``BootStrapper``, ``MetricTracker``) do not each hold another CLIP."""
        return self

    def __getstate__(self) -> dict:
        """Everything but the lock (locks do not pickle; an unpickled model gets its own)."""
        return {k: v for k, v in self.__dict__.items() if k != "device_lock"}

    def __setstate__(self, state: dict) -> None:
        """Restore the fields and give the model a new lock."""
        self.__dict__.update(state)
        object.__setattr__(self, "device_lock", threading.Lock())

    def embed_samples(self, samples: Sequence[Sample]) -> tuple[list[Embeddings], dict[str, float]]:
        """The embed stage's work on a batch: every segment crop and whole image through the image tower in one
        pass, every caption through the text tower; also the wall / thread-CPU milliseconds of preprocessing and of
        the forwards (``TIMINGS``). A method, so that it runs in the model's process behind Beam's model proxy."""
        apply_torch_threads(self.torch_threads)
        started, started_cpu = time.perf_counter(), time.thread_time()
        crops = [segment_crops(sample) for sample in samples]  # CPU work: outside the device lock
        images = [crop for sample_crops in crops for crop in sample_crops] + [sample.image for sample in samples]
        before_lock = time.perf_counter()
        with self.device_lock:
            waited = time.perf_counter() - before_lock  # behind another thread's batch: not this batch's work
            pixels = preprocess_images(self, images)
            preprocessed, preprocessed_cpu = time.perf_counter(), time.thread_time()
            vectors = encode_pixels(self, pixels)
            captions = embed_texts(self, [sample.caption for sample in samples])
        timings = {
            "preprocess_ms": 1000 * (preprocessed - started - waited),
            "preprocess_cpu_ms": 1000 * (preprocessed_cpu - started_cpu),
            "forward_ms": 1000 * (time.perf_counter() - preprocessed),
            "forward_cpu_ms": 1000 * (time.thread_time() - preprocessed_cpu),
            "torch_threads": torch.get_num_threads(),
        }
        whole = vectors[len(vectors) - len(samples) :]
        results, start = [], 0
        for i, sample_crops in enumerate(crops):
            segments = vectors[start : start + len(sample_crops)].copy()
            results.append(Embeddings(segments=segments, image=whole[i].copy(), caption=captions[i].copy()))
            start += len(sample_crops)
        return results, timings


class WeightsUnavailableError(FileNotFoundError, RuntimeError):
    """Pretrained weights that are neither cached nor downloadable here: a missing file (OSError), so the CLI answers
    with the message and exit status 2 instead of a traceback; still a RuntimeError for callers that caught the
    loader's RuntimeError before (eval's ModelLoadError wrapper)."""


def check_pretrained(spec: ClipSpec) -> None:
    """Launcher-side check of --clip-model / --clip-pretrained, before any output is written: ValueError for an
    unknown architecture or a value that is neither a tag, an existing file, nor `none`; WeightsUnavailableError
    for a tag whose weights are not cached while the hub is offline (HF_HUB_OFFLINE: a cache lookup, no download;
    online, the workers fetch the weights themselves)."""
    _check_model_name(spec.model)
    tags = open_clip.list_pretrained_tags_by_model(spec.model)
    if spec.pretrained in tags:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            _fetch_pretrained(spec)
        return
    if spec.pretrained != RANDOM_INIT and not os.path.isfile(spec.pretrained):
        raise ValueError(
            f"--clip-pretrained {spec.pretrained!r} is neither a tag of {spec.model} ({', '.join(tags) or 'none'}), "
            f"nor an existing checkpoint file, nor `none` (random init, for testing)"
        )


def _fetch_pretrained(spec: ClipSpec) -> dict:
    """Download (or find in the cache) the weights of a pretrained tag; returns the tag's config.
    WeightsUnavailableError, with what to do instead, when they cannot be had."""
    tag_cfg = open_clip.get_pretrained_cfg(spec.model, spec.pretrained)
    try:
        open_clip.download_pretrained(tag_cfg)
    except (OSError, RuntimeError, ValueError) as e:  # hub, HTTP, file and checksum errors alike
        raise WeightsUnavailableError(
            f"--clip-pretrained {spec.pretrained!r}: the weights of {spec.model} are not available "
            f"(no network or HF_HUB_OFFLINE=1, and nothing cached). Pass a local checkpoint file "
            f"(--clip-pretrained /path/to/open_clip_model.safetensors) or `none` (random init, for testing). "
            f"Cause: {e}"
        ) from e
    return tag_cfg


def _check_model_name(name: str) -> dict:
    """Return the open_clip config of ``name`` or raise a ValueError listing valid choices."""
    names = open_clip.list_models()
    if name not in names:
        examples = [n for n in ("ViT-L-14", "ViT-B-32", "ViT-B-16", TINY_MODEL) if n in names]
        raise ValueError(
            f"--clip-model {name!r} is not an open_clip architecture; choose e.g. {', '.join(examples)} "
            f"({len(names)} choices: open_clip.list_models())"
        )
    return open_clip.get_model_config(name)


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint's state dict without unpickling arbitrary objects (safetensors or weights_only)."""
    return read_state_dict(path, "--clip-pretrained")


def _create(spec: ClipSpec) -> tuple[torch.nn.Module, Callable, str]:
    """Create the model per ``spec.pretrained``: a tag (downloaded / cached), a local file, or random init."""
    tags = open_clip.list_pretrained_tags_by_model(spec.model)
    kwargs: dict[str, Any] = {"device": spec.device, "pretrained_text": False, "weights_only": True}
    if spec.pretrained in tags:
        tag_cfg = _fetch_pretrained(spec)  # first, so that only a missing download gets its message
        kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))  # e.g. OpenAI's weights need QuickGELU
        model, _, preprocess = open_clip.create_model_and_transforms(spec.model, spec.pretrained, **kwargs)
        return model, preprocess, spec.pretrained
    check_pretrained(spec)  # not a tag: an existing file or `none`, else ValueError
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model, _, preprocess = open_clip.create_model_and_transforms(spec.model, None, **kwargs)
    if spec.pretrained == RANDOM_INIT:
        logger.warning("CLIP %s: pretrained: %s", spec.model, RANDOM_INIT_LABEL)
        return model, preprocess, RANDOM_INIT_LABEL
    try:
        model.load_state_dict(_load_state_dict(spec.pretrained), strict=True)
    except RuntimeError as e:
        raise ValueError(f"--clip-pretrained {spec.pretrained!r} does not fit --clip-model {spec.model}: {e}") from e
    return model, preprocess, spec.pretrained


def clip_embed_dim(model: str) -> int:
    """The embedding dimension D of an open_clip architecture, without building it."""
    return int(_check_model_name(model)["embed_dim"])


def load_clip(spec: ClipSpec) -> ClipModel:
    """Load the CLIP model, eval transform and tokenizer that ``spec`` names."""
    config = _check_model_name(spec.model)
    model, preprocess, label = _create(spec)
    model.eval().requires_grad_(False)
    if spec.precision != "fp32" and not spec.device.startswith("cuda"):
        logger.info("CLIP precision %s applies on cuda only; running fp32 on %s", spec.precision, spec.device)
    elif spec.precision != "fp32":
        # Half-precision weights, not autocast: ViT-L/14 on an H100 ran 2,660 img/s this way vs 1,819 under
        # autocast, which also keeps LayerNorm in float32 (benchmarks/pipeline_gpu.py). Embeddings are normalised
        # in float32 either way.
        model = model.to(torch.bfloat16 if spec.precision == "bf16" else torch.float16)
    logger.info("CLIP loaded: model=%s pretrained=%s device=%s", spec.model, label, spec.device)
    tokenizer = open_clip.get_tokenizer(spec.model)
    pixel_transform = PixelTransform.from_compose(preprocess)
    if pixel_transform is None:
        logger.info("CLIP %s: transform %s has steps without a tensor twin; preprocessing with PIL", spec.model,
                    preprocess)
    return ClipModel(model, preprocess, tokenizer, int(config["embed_dim"]), label, spec, pixel_transform)


def _dtype(model: ClipModel) -> torch.dtype:
    """The dtype of the model's weights (what its inputs must be cast to)."""
    return next(model.model.parameters()).dtype


def _unit(features: torch.Tensor) -> np.ndarray:
    """L2-normalise rows in float32 and return them as a numpy array."""
    return F.normalize(features.float(), dim=-1).cpu().numpy()


def preprocess_images(model: ClipModel, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    """The model's own eval transform of each image (PIL or H x W x 3 uint8 RGB array), stacked: N x 3 x S x S.

    With a tensor twin of the transform (``clip_preprocess``) the work runs on the model's device; otherwise the
    PIL transform runs on the CPU.
    """
    if model.pixel_transform is not None:
        arrays = [np.asarray(im.convert("RGB")) if isinstance(im, Image.Image) else im for im in images]
        return model.pixel_transform(arrays, model.spec.device)
    return torch.stack([model.preprocess(im if isinstance(im, Image.Image) else Image.fromarray(im)) for im in images])


def encode_pixels(model: ClipModel, pixels: torch.Tensor) -> np.ndarray:
    """The model forward: preprocessed pixels -> L2-normalised image embeddings (N x D float32)."""
    if not len(pixels):
        return np.zeros((0, model.embed_dim), dtype=np.float32)
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(pixels), MAX_IMAGES_PER_FORWARD):
            chunk = pixels[start : start + MAX_IMAGES_PER_FORWARD].to(model.spec.device, dtype=_dtype(model))
            chunks.append(_unit(model.model.encode_image(chunk)))
    return np.concatenate(chunks)


def embed_images(model: ClipModel, images: Iterable[Image.Image | np.ndarray]) -> np.ndarray:
    """Return the L2-normalised CLIP image embeddings (N x D float32) of images (PIL or uint8 arrays), in order."""
    images = list(images)  # any iterable (a generator too), sliced into chunks below
    if not images:
        return np.zeros((0, model.embed_dim), dtype=np.float32)
    step = MAX_IMAGES_PER_FORWARD  # preprocessed chunk by chunk: N images never sit preprocessed at once
    return np.concatenate([encode_pixels(model, preprocess_images(model, images[start : start + step]))
                           for start in range(0, len(images), step)])


def prompt_list(prompts: str | Sequence[str], name: str = "prompts") -> list[str]:
    """``prompts`` as a list of strings: a lone string is one prompt (diffusers' convention), not one per character;
    anything but strings is a ValueError naming ``name``."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence):
        raise ValueError(f"{name} must be a string or a sequence of strings, got {type(prompts).__name__}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"{name}[{i}] must be a string, got {type(prompt).__name__}")
    return list(prompts)


def embed_texts(model: ClipModel, texts: str | Sequence[str]) -> np.ndarray:
    """Return the L2-normalised CLIP text embeddings (N x D float32) of strings, in order (one string: N = 1)."""
    texts = prompt_list(texts, "texts")
    if not texts:
        return np.zeros((0, model.embed_dim), dtype=np.float32)
    step = MAX_IMAGES_PER_FORWARD  # as many texts per forward as images: activations stay bounded
    with torch.inference_mode():
        return np.concatenate([_unit(model.model.encode_text(model.tokenizer(texts[start : start + step])
                                                            .to(model.spec.device)))
                               for start in range(0, len(texts), step)])


def segment_crops(sample: Sample) -> list[np.ndarray]:
    """Return the square crops (uint8 arrays) of a sample's selected segments, in index order."""
    if sample.segment_map is None:
        raise ValueError(f"sample {sample.key!r} has no segment_map: the select stage must run before embedding")
    segments = sorted(sample.segments, key=lambda s: s.index)
    return [labeled_crop_array(sample.image, sample.segment_map, s.index, s.bbox) for s in segments]
