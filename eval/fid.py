r"""FID between generated and reference images: torchmetrics ``FrechetInceptionDistance`` with a named extractor.

.. math:: FID = \|\mu_r - \mu_g\|^2 + tr(\Sigma_r + \Sigma_g - 2(\Sigma_r \Sigma_g)^{1/2})

Two feature extractors, and every report names the one used (``make_fid`` returns a description with the extractor,
its weights, the resize mode, the feature dimension and the library versions; ``fid_summary`` adds the image counts):

- ``inception`` (the standard): torchmetrics' FID Inception-v3 (2048-d pool features; needs ``torch-fidelity``).
  Offline, pass the standard weights file with ``--inception-weights PATH`` (torch-fidelity's
  ``weights-inception-2015-12-05-6726825d.pth`` or a ``.safetensors`` of the same state dict). Without a path,
  torch-fidelity downloads them (or finds them in the torch hub cache); when it cannot, ``ModelLoadError`` says what
  to pass. Images are resized to 299 x 299 by torchmetrics with the original TF1 bilinear (torch-fidelity's
  ``interpolate_bilinear_2d_like_tensorflow1x``), as the reference FID code and torch-fidelity do; torchmetrics'
  own default, bilinear with antialiasing (``antialias=True``), changes the features, and resizing is known to move
  FID, so such an FID is reported as not comparable with published FIDs.
- ``clip``: L2-normalised CLIP image embeddings (``ClipFeatureExtractor``: the pipeline's preprocessing and forward,
  i.e. ``spatext.pipeline.clip.embed_images``), for when the Inception weights are absent. Values are not
  comparable with Inception FID and the report says so via its ``extractor`` field.

The Fréchet distance itself is torchmetrics' own ``_compute_fid`` (the function its class uses), exposed here as
``frechet_distance``; the tests compare it with an independent scipy float64 computation.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torchmetrics.image.fid import FrechetInceptionDistance, _compute_fid

from spatext.eval.errors import ModelLoadError
from spatext.pipeline.clip import ClipModel, encode_pixels, preprocess_images
from spatext.pipeline.weights import file_sha256, read_state_dict
from spatext.versions import package_versions

logger = logging.getLogger(__name__)

EXTRACTORS = ("inception", "clip")
INCEPTION_FEATURES = 2048
INCEPTION_SIZE = 299
FID_BATCH = 64  # images per extractor forward in fid_update: memory stays flat with the benchmark's size
# torch-fidelity's file is weights-inception-2015-12-05-6726825d.pth: torch hub names files by their sha256's start.
STANDARD_INCEPTION_SHA256_PREFIX = "6726825d"


class ClipFeatureExtractor(torch.nn.Module):
    """FID features from CLIP: uint8 N x 3 x H x W in, L2-normalised image embeddings (N x D, float64) out.

    The images go through the pipeline's own preprocessing (``spatext.pipeline.clip.preprocess_images``: the model's
    eval transform on uint8 tensors, resized by ``spatext.pipeline.resize``), so a CLIP-FID feature of an image is
    its pipeline embedding (``embed_images``). The CLIP model stays where its spec put it (it is not a submodule, so
    ``metric.to`` does not move it).
    """

    def __init__(self, clip: ClipModel) -> None:
        """Keep the CLIP model."""
        super().__init__()
        self.clip = clip
        self.num_features = int(clip.embed_dim)
        self._preprocessed = False  # see preprocessed_input

    @property
    def resize_mode(self) -> str:
        """The model transform's resize and crop steps, and how the pipeline runs them (for reports)."""
        steps = getattr(self.clip.preprocess, "transforms", [self.clip.preprocess])
        geometry = [repr(s).replace("\n", "") for s in steps if type(s).__name__ in ("Resize", "CenterCrop")]
        how = ("on uint8 tensors (spatext.pipeline.clip_preprocess.PixelTransform, antialiased uint8 resize of "
               "spatext.pipeline.resize)" if self.clip.pixel_transform is not None
               else "with PIL (the model's own transform)")
        return f"{' -> '.join(geometry) or repr(self.clip.preprocess)}, as the pipeline embeds images: {how}"

    def preprocess_arrays(self, images: Sequence[np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
        """The pipeline's preprocessing of H x W x 3 uint8 RGB arrays (any sizes): float N x 3 x S x S on ``device``."""
        return preprocess_images(self.clip, list(images)).to(device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The pipeline's preprocessing of uint8 RGB images (N x 3 x H x W): float N x 3 x S x S, on their device."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 N x 3 x H x W images, got {images.dtype} {tuple(images.shape)}")
        arrays = [np.ascontiguousarray(image.numpy()) for image in images.detach().permute(0, 2, 3, 1).cpu()]
        return self.preprocess_arrays(arrays, images.device)

    @contextlib.contextmanager
    def preprocessed_input(self) -> Iterator[None]:
        """Within: ``forward`` takes float images already through ``preprocess`` (N x 3 x S x S), as ``fid_update``
        passes images of many sizes. Outside, float input is refused: float images in [0, 1] (torchmetrics'
        ``normalize=True`` convention) would otherwise be taken for CLIP-normalised pixels, a wrong FID."""
        self._preprocessed = True
        try:
            yield
        finally:
            self._preprocessed = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed uint8 RGB images (N x 3 x H x W); float ones already through ``preprocess`` (N x 3 x S x S) only
        within ``preprocessed_input``."""
        if images.is_floating_point() and not self._preprocessed:
            raise ValueError(f"images must be uint8 N x 3 x H x W (0..255), got {images.dtype}: the CLIP extractor "
                             "preprocesses them itself (float images in [0, 1]: (images * 255).round().byte())")
        pixels = images.detach() if images.is_floating_point() else self.preprocess(images)
        # float64 so that torchmetrics returns the FID in float64 (it casts the result to the features' dtype).
        return torch.from_numpy(encode_pixels(self.clip, pixels)).to(images.device, torch.float64)


def _safe_inception_file(path: str, directory: str) -> str:
    """Re-save the state dict at ``path`` as a plain tensor file (torch-fidelity unpickles with weights_only=False)."""
    state = read_state_dict(path, "--inception-weights")
    safe = os.path.join(directory, "inception.pt")
    torch.save(state, safe)
    return safe


def _inception_fid(weights: str | None, antialias: bool) -> FrechetInceptionDistance:
    """torchmetrics' FID with the FID Inception-v3, weights from ``weights`` or torch-fidelity's download."""
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ModuleNotFoundError(
            "the inception FID extractor needs torch-fidelity: `pip install torch-fidelity` (torchmetrics[image]); "
            "or use the CLIP extractor (--fid-extractor clip)"
        )
    if weights is not None and not os.path.isfile(weights):
        raise ValueError(f"--inception-weights {weights!r} is not a file")
    if weights is None:
        try:
            return FrechetInceptionDistance(feature=INCEPTION_FEATURES, antialias=antialias)
        except Exception as e:  # whatever the download raises offline (URLError, OSError, HTTP errors, ...)
            raise ModelLoadError(
                "the standard FID Inception weights are not available (no network and not in the torch hub cache). "
                "Pass a local file with --inception-weights PATH, or use --fid-extractor clip. "
                f"Cause: {type(e).__name__}: {e}"
            ) from e
    with tempfile.TemporaryDirectory() as directory:
        safe = _safe_inception_file(weights, directory)
        try:
            return FrechetInceptionDistance(
                feature=INCEPTION_FEATURES, feature_extractor_weights_path=safe, antialias=antialias
            )
        except RuntimeError as e:
            raise ValueError(f"--inception-weights {weights!r} does not fit the FID Inception-v3: {e}") from e


def inception_weights_description(path: str | None) -> dict:
    """How a report names the Inception weights: torch-fidelity's download, or a local file by its absolute path and
    sha256, with ``comparable`` saying whether that is the standard file (its sha256 starts with the prefix in the
    standard file's name). A FID from other weights is not comparable with published FIDs, and reports say so."""
    if path is None:
        return {"weights": "torch-fidelity FID Inception weights (download / torch hub cache)", "comparable": True}
    sha256 = file_sha256(path)
    standard = sha256.startswith(STANDARD_INCEPTION_SHA256_PREFIX)
    what = ("the standard FID Inception file" if standard else
            f"NOT the standard FID Inception file (its sha256 starts with {STANDARD_INCEPTION_SHA256_PREFIX})")
    return {"weights": f"{os.path.abspath(path)} (sha256 {sha256[:16]}…, {what})", "weights_sha256": sha256,
            "comparable": standard}


def make_fid(
    extractor: str = "inception",
    inception_weights: str | None = None,
    clip: ClipModel | None = None,
    device: str = "cpu",
    antialias: bool = False,
) -> tuple[FrechetInceptionDistance, dict]:
    """A configured FID metric (on ``device``) and the description every report must carry.

    ``antialias`` (Inception only): torchmetrics' antialiased bilinear resize instead of the standard TF1 one. The
    description's ``comparable`` is True only for the standard weights with the standard resize, and
    ``not_comparable_because`` says what differs."""
    if extractor not in EXTRACTORS:
        raise ValueError(f"--fid-extractor {extractor!r} is not valid; choose one of {', '.join(EXTRACTORS)}")
    versions = package_versions(("torchmetrics", "torch", "torch-fidelity", "open_clip_torch"))
    if extractor == "inception":
        metric = _inception_fid(inception_weights, antialias)
        resize = (
            f"bilinear{' antialiased' if antialias else ' (TF1-compatible)'} to {INCEPTION_SIZE}x{INCEPTION_SIZE}"
        )
        weights = inception_weights_description(inception_weights)
        reasons = [] if weights["comparable"] else ["not the standard Inception weights"]
        if antialias:
            reasons.append("antialiased resize, not the standard TF1 bilinear")
        description = {
            "extractor": "inception-v3 (FID, torchmetrics / torch-fidelity)",
            "name": "FID",
            **weights,
            "comparable": not reasons,
            "resize": resize,
            "feature_dim": INCEPTION_FEATURES,
        }
        if reasons:
            description["not_comparable_because"] = "; ".join(reasons)
    else:
        if clip is None:
            raise ValueError("--fid-extractor clip needs a CLIP model (clip=load_clip(...))")
        features = ClipFeatureExtractor(clip)
        metric = FrechetInceptionDistance(feature=features)
        description = {
            "extractor": f"clip:{clip.spec.model} (L2-normalised image embeddings; not comparable to Inception FID)",
            "name": f"FID on CLIP {clip.spec.model} features",
            "weights": clip.pretrained_label,
            "comparable": False,
            "not_comparable_because": "CLIP features, not Inception-v3",
            "resize": features.resize_mode,
            "feature_dim": features.num_features,
        }
    description.update({"input": "uint8 RGB", "versions": versions})
    logger.info("FID: %s, weights %s", description["extractor"], description["weights"])
    return metric.to(device), description


def fid_update(metric: FrechetInceptionDistance, images: Sequence[np.ndarray], real: bool,
               batch_size: int = FID_BATCH) -> None:
    """Add H x W x 3 uint8 images (any sizes) to the real or the generated side, at most `batch_size` per forward,
    so memory stays flat however many images a benchmark has (one forward of 64 Inception images takes ~0.9 GB)."""
    # CLIP: images through the pipeline's preprocessing, chunk by chunk. Inception: images of equal size are batched
    # together and torchmetrics resizes them (images of many sizes mean many small batches).
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
    for i, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            got = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"images[{i}] must be an H x W x 3 uint8 array, got {got}")
        by_shape.setdefault(image.shape, []).append(image)
    if isinstance(metric.inception, ClipFeatureExtractor):
        with metric.inception.preprocessed_input():
            for start in range(0, len(images), batch_size):
                chunk = metric.inception.preprocess_arrays(images[start : start + batch_size], metric.device)
                metric.update(chunk.contiguous(), real=real)
        return
    for group in by_shape.values():
        for start in range(0, len(group), batch_size):
            chunk = torch.from_numpy(np.stack(group[start : start + batch_size])).permute(0, 3, 1, 2)
            metric.update(chunk.to(metric.device).contiguous(), real=real)


def fid_summary(metric: FrechetInceptionDistance, description: dict) -> dict:
    """The FID value with its description and the image counts on each side (what a report prints). A distance is
    never negative: rounding can make the computed value of two equal sets -1e-9, reported as 0 (NaN stays NaN)."""
    value = float(metric.compute())
    return {
        "fid": value if math.isnan(value) else max(0.0, value),
        "num_real": int(metric.real_features_num_samples),
        "num_generated": int(metric.fake_features_num_samples),
        **description,
    }


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): torchmetrics' ``_compute_fid``, the class's math."""
    return _compute_fid(mu1, sigma1, mu2, sigma2)


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (float64) of N x d features, as ``FrechetInceptionDistance.compute`` forms them."""
    features = features.double()
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be N x d with N >= 2, got shape {tuple(features.shape)}")
    n = features.shape[0]
    mean = features.sum(dim=0) / n
    cov = (features.t().mm(features) - n * torch.outer(mean, mean)) / (n - 1)
    return mean, cov


def frechet_distance_from_features(features1: torch.Tensor, features2: torch.Tensor) -> torch.Tensor:
    """Functional FID on precomputed features: statistics of each set, then ``frechet_distance``."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
