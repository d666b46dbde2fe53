r"""Global and Local distance: CLIP image-text cosine distances (DESIGN.md, "Metrics"). Lower is better.

.. math::
    \text{Global} = \frac{1}{N}\sum_j 1 - \cos(\text{CLIP}_{img}(x_j), \text{CLIP}_{txt}(p_j))

    \text{Local} = \frac{1}{\sum_j K_j}\sum_{j, i} 1 - \cos(\text{CLIP}_{img}(\text{crop}(x_j, m_{j,i})),
    \text{CLIP}_{txt}(p_{j,i}))

``crop`` is the pipeline's ``segment_crop`` (tightest square around the mask, outside black), followed by the model's
own transform — imported from ``spatext.pipeline``, the same function that made the training embeddings.

Inputs: images are H x W x 3 uint8 arrays; masks are index maps of the same H x W (``eval/masks.py``) whose regions
are exactly 1..K, with ``local_prompts[j][i - 1]`` the prompt of region i. Each metric is a torchmetrics ``Metric``
(float64 sum + count states, ``dist_reduce_fx="sum"``) with a functional twin; both call the same ``*_pairs``
function, so they cannot drift apart. Example (``clip`` from ``spatext.pipeline.clip.load_clip``)::

    metric = GlobalDistance(clip)
    metric.update(images, prompts)   # any number of times, on any number of processes
    metric.compute()                 # == global_distance(all_images, all_prompts, clip)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

from spatext.eval.masks import check_index_map, region_indices
from spatext.pipeline.clip import MAX_IMAGES_PER_FORWARD, ClipModel, embed_images, embed_texts, prompt_list
from spatext.pipeline.crop import segment_crop


def check_images(images: Sequence[np.ndarray], name: str = "images") -> None:
    """Raise a ValueError unless every item is an H x W x 3 uint8 array."""
    for i, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            got = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"{name}[{i}] must be an H x W x 3 uint8 array, got {got}")


def check_lengths(**named: Sequence) -> None:
    """Raise a ValueError unless all sequences have the same length."""
    lengths = {name: len(value) for name, value in named.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have the same length, got {lengths}")


def cosine_distances(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Row-wise 1 - cos(a_k, b_k) in float64 (inputs need not be normalised)."""
    a = F.normalize(torch.as_tensor(image_embeddings).double(), dim=-1)
    b = F.normalize(torch.as_tensor(text_embeddings).double(), dim=-1)
    return 1.0 - (a * b).sum(dim=-1)


def global_pairs(images: Sequence[np.ndarray], prompts: Sequence[str], clip: ClipModel) -> torch.Tensor:
    """One Global distance per image (float64, N)."""
    check_images(images)
    prompts = prompt_list(prompts)
    check_lengths(images=images, prompts=prompts)
    image_vectors = embed_images(clip, [Image.fromarray(image) for image in images])
    text_vectors = embed_texts(clip, prompts)
    return cosine_distances(torch.from_numpy(image_vectors), torch.from_numpy(text_vectors))


def local_crops(image: np.ndarray, masks: np.ndarray, prompts: Sequence[str], name: str = "masks") -> list[Image.Image]:
    """The segment crops of regions 1..K of one sample (K = len(prompts)), in index order."""
    check_index_map(masks, image.shape[:2], name)
    regions = region_indices(masks)
    if regions != list(range(1, len(prompts) + 1)):
        raise ValueError(f"{name} holds regions {regions}; with {len(prompts)} local prompts it must hold exactly "
                         f"1..{len(prompts)}")
    return [segment_crop(image, masks == index) for index in regions]


def local_pairs(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray], local_prompts: Sequence[Sequence[str]], clip: ClipModel
) -> torch.Tensor:
    """One Local distance per (sample, region), samples in order, regions by index (float64, sum of K_j)."""
    check_images(images)
    check_lengths(images=images, masks=masks, local_prompts=local_prompts)
    crops, texts, vectors = [], [], []
    for j, (image, index_map, prompts) in enumerate(zip(images, masks, local_prompts, strict=True)):
        crops += local_crops(image, index_map, prompts, name=f"masks[{j}]")
        texts += list(prompts)
        if len(crops) >= MAX_IMAGES_PER_FORWARD:  # embedded as they come: a benchmark's crops never sit in memory
            vectors.append(embed_images(clip, crops))  # at once (thousands of up to image-sized squares)
            crops = []
    vectors.append(embed_images(clip, crops))
    image_vectors = np.concatenate(vectors)
    text_vectors = embed_texts(clip, texts)
    return cosine_distances(torch.from_numpy(image_vectors), torch.from_numpy(text_vectors))


def global_distance(images: Sequence[np.ndarray], prompts: Sequence[str], clip: ClipModel) -> torch.Tensor:
    """Functional Global distance: mean over images of 1 - cos(CLIP image, CLIP text of the global prompt)."""
    return mean_of(global_pairs(images, prompts, clip))


def local_distance(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray], local_prompts: Sequence[Sequence[str]], clip: ClipModel
) -> torch.Tensor:
    """Functional Local distance: mean over (sample, region) of 1 - cos(CLIP crop, CLIP local prompt)."""
    return mean_of(local_pairs(images, masks, local_prompts, clip))


def mean_of(values: torch.Tensor) -> torch.Tensor:
    """Mean of a non-empty float64 vector."""
    if values.numel() == 0:
        raise ValueError("nothing to average: no images / regions were given")
    return values.sum() / values.numel()


class MeanOfPairs(Metric):
    """A metric that is the mean of one value per (sample[, region]) pair: float64 sum and count states."""

    is_differentiable = False
    full_state_update = False
    total: torch.Tensor
    count: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        """Add the two summed states."""
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _accumulate(self, values: torch.Tensor) -> None:
        """Add per-pair values to the states."""
        self.total += values.to(self.total.device, torch.float64).sum()
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        """The mean over every pair seen (on every process); NaN, with a warning, before any pair (as torchmetrics'
        ``MeanMetric``): ``forward`` on a batch without a region returns NaN and keeps what was accumulated."""
        if self.count == 0:
            rank_zero_warn(f"{type(self).__name__}: no pair seen yet (an update without images or regions): the mean "
                           "is NaN")
            return torch.tensor(math.nan, dtype=torch.float64, device=self.total.device)
        return self.total / self.count


class GlobalDistance(MeanOfPairs):
    """Global distance as a torchmetrics Metric (see ``global_distance``)."""

    higher_is_better = False

    def __init__(self, clip: ClipModel, **kwargs: Any) -> None:
        """Keep the CLIP model (it stays on its own device)."""
        super().__init__(**kwargs)
        self.clip = clip

    def update(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> None:
        """Accumulate the distances of a batch of images and their global prompts."""
        self._accumulate(global_pairs(images, prompts, self.clip))


class LocalDistance(MeanOfPairs):
    """Local distance as a torchmetrics Metric (see ``local_distance``)."""

    higher_is_better = False

    def __init__(self, clip: ClipModel, **kwargs: Any) -> None:
        """Keep the CLIP model (it stays on its own device)."""
        super().__init__(**kwargs)
        self.clip = clip

    def update(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], local_prompts: Sequence[Sequence[str]]
    ) -> None:
        """Accumulate the distances of every region of a batch of images."""
        self._accumulate(local_pairs(images, masks, local_prompts, self.clip))
