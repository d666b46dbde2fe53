"""Fast antialiased resizing of uint8 RGB images: the one home of "downscale an image" for the build.

PIL (without SIMD) spends 2-7 ms on a 512-px bicubic or Lanczos resize; torch's uint8 antialiased kernels (AVX2 on
CPU) do it in 0.3-1.4 ms and match PIL's BICUBIC to within one grey level (tests/test_resize.py checks that against
PIL). On a GPU, whose antialiased kernels take floating point only, the resize runs in float32 and is rounded back
(mean difference to PIL's ~0.1 level; a few levels at hard edges where PIL clips between its two passes; tested on the
CPU through ``resize_via_float``). The build uses these for the
stored image (decode stage) and the CLIP eval transform (``spatext.pipeline.clip_preprocess``); the training loader
(``spatext.model.crops``) for its crops.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MODES = ("bicubic", "bilinear")


def as_chw_tensor(image: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """An H x W x 3 uint8 array (or tensor) as a 1 x 3 x H x W uint8 view in channels-last memory (no copy on CPU).

    Channels-last is the layout torch's fast uint8 resize kernels take, and it is how decoded images already lie.
    """
    tensor = torch.as_tensor(image) if isinstance(image, torch.Tensor) else torch.from_numpy(_writable(image))
    if tensor.ndim != 3 or tensor.shape[2] != 3 or tensor.dtype != torch.uint8:
        raise ValueError(f"image must be H x W x 3 uint8, got shape {tuple(tensor.shape)} dtype {tensor.dtype}")
    if device is not None:
        tensor = tensor.to(device, non_blocking=True)
    # unsqueeze before permuting: the batch stride is then H*W*3, which torch recognises as channels-last (permute
    # then unsqueeze gives a batch stride of 3, and the uint8 resize falls back to its slow generic path: 1.0 vs
    # 0.30 ms for a ~300 px image to 512 px, bilinear; measured)
    return tensor.unsqueeze(0).permute(0, 3, 1, 2)


def _writable(array: np.ndarray) -> np.ndarray:
    """The array itself when torch may share it, else a copy (torch refuses to wrap read-only memory quietly)."""
    return array if array.flags.writeable else array.copy()


def resize_chw(batch: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize a N x 3 x H x W uint8 tensor to ``size`` = (height, width), antialiased; uint8 out (rounded, clamped)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if tuple(batch.shape[-2:]) == tuple(size):
        return batch
    if batch.device.type == "cpu":
        return F.interpolate(batch, size=size, mode=mode, antialias=True, align_corners=False)
    return resize_via_float(batch, size, mode)  # CUDA's antialiased kernels take floating point only


def resize_via_float(batch: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """``resize_chw`` for devices without uint8 antialiased kernels: resize in float32, round, clamp to uint8."""
    out = F.interpolate(batch.float(), size=size, mode=mode, antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def resize_image(image: np.ndarray, size: tuple[int, int], mode: str = "bicubic") -> np.ndarray:
    """Resize an H x W x 3 uint8 array to ``size`` = (width, height) as PIL's ``resize`` would; returns a new array."""
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"size must be positive, got {size}")
    if (image.shape[1], image.shape[0]) == (width, height):
        return image.copy()
    out = resize_chw(as_chw_tensor(image), (height, width), mode)
    return hwc_array(out[0])


def hwc_array(chw: torch.Tensor) -> np.ndarray:
    """A 3 x H x W uint8 CPU tensor as a new H x W x 3 array. Copied one channel at a time: numpy's (and torch's)
    transposing copy of a planar image is 3-4x slower (0.55-0.66 vs 0.17 ms at 512 x 384, measured)."""
    hwc = chw.permute(1, 2, 0)
    if hwc.is_contiguous():  # already interleaved in memory
        return np.array(hwc.numpy())
    planes = chw.numpy()
    out = np.empty((*planes.shape[1:], planes.shape[0]), dtype=planes.dtype)
    for channel, plane in enumerate(planes):
        out[..., channel] = plane
    return out


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map or mask (H x W bool, uint8 or integer ids) to ``size`` (height, width):
    labels are picked, never blended (PIL's NEAREST: each output pixel takes the input pixel under its centre). The
    one home of this for masks and index maps (scenes, scene pictures, inspect)."""
    if labels.shape == tuple(size):
        return labels
    if labels.dtype == bool:
        return resize_labels(labels.view(np.uint8), size).astype(bool)
    source = labels if labels.dtype == np.uint8 else labels.astype(np.int32)
    if source is not labels and not np.array_equal(source, labels):
        raise ValueError(f"labels of dtype {labels.dtype} do not fit int32")
    out = np.asarray(Image.fromarray(source).resize((size[1], size[0]), Image.Resampling.NEAREST))
    return out.astype(labels.dtype, copy=False)
