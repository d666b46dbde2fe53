"""Fast uint8 resizing and the tensor CLIP transform, against PIL and open_clip's own PIL transform."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from spatext.pipeline.clip_preprocess import PixelTransform
from spatext.pipeline.resize import as_chw_tensor, hwc_array, resize_image, resize_via_float


def _photo(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth gradient with noise and a hard edge: enough structure for resampling differences to show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([255 * x, 255 * y, 255 * (1 - x) * y], axis=-1) + rng.normal(0, 20, (height, width, 3))
    base[height // 3 : height // 2, width // 4 :] = [250, 10, 40]
    return base.clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("shape", "size"),
    [((640, 480), (512, 384)), ((583, 501), (224, 192)), ((300, 900), (171, 57)), ((40, 30), (90, 120))],
)
def test_resize_image_matches_pil_bicubic_within_one_level(shape, size) -> None:
    image = _photo(*shape, seed=sum(shape))
    ours = resize_image(image, size)
    pil = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
    assert ours.shape == pil.shape == (size[1], size[0], 3) and ours.dtype == np.uint8
    diff = np.abs(ours.astype(int) - pil.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.05


@pytest.mark.parametrize(("shape", "size"), [((583, 501), (224, 192)), ((40, 30), (90, 120))])
def test_float_path_for_gpus_stays_close_to_pil(shape, size) -> None:
    image = _photo(*shape, seed=7)
    ours = resize_via_float(as_chw_tensor(image), (size[1], size[0]))[0].permute(1, 2, 0).numpy()
    pil = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
    assert ours.dtype == np.uint8 and ours.shape == pil.shape
    # PIL rounds and clips between its horizontal and vertical passes; float32 does not: a few levels apart at clipped
    # hard edges only
    diff = np.abs(ours.astype(int) - pil.astype(int))
    assert diff.mean() < 0.2 and (diff > 1).mean() < 0.005 and diff.max() <= 10


def test_resize_image_same_size_is_a_copy_and_bad_input_fails() -> None:
    image = _photo(20, 30, seed=1)
    out = resize_image(image, (30, 20))
    assert np.array_equal(out, image) and not np.shares_memory(out, image)
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        as_chw_tensor(image.astype(np.float32))
    with pytest.raises(ValueError, match="positive"):
        resize_image(image, (0, 5))


def test_as_chw_tensor_is_a_channels_last_view_the_fast_resize_keeps() -> None:
    image = _photo(40, 60, seed=2)
    x = as_chw_tensor(image)
    assert x.shape == (1, 3, 40, 60) and np.shares_memory(x.numpy(), image)  # a view, no copy
    # proper channels-last strides (batch stride H*W*3): torch's fast uint8 kernels take it and answer in kind
    assert x.is_contiguous(memory_format=torch.channels_last) and x.stride() == (40 * 60 * 3, 1, 60 * 3, 3)
    out = torch.nn.functional.interpolate(x, size=(30, 45), mode="bicubic", antialias=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    planar = torch.nn.functional.interpolate(x.contiguous(), size=(30, 45), mode="bicubic", antialias=True)
    assert torch.equal(out, planar)  # the layout changes the speed, not the pixels


def test_hwc_array_is_a_writable_copy_of_the_transpose_for_both_memory_layouts() -> None:
    planar = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (3, 37, 53), dtype=np.uint8))
    interleaved = torch.from_numpy(np.ascontiguousarray(planar.permute(1, 2, 0).numpy())).permute(2, 0, 1)
    for chw in (planar, interleaved):
        out = hwc_array(chw)
        expected = np.transpose(chw.numpy(), (1, 2, 0))
        assert out.shape == (37, 53, 3) and out.dtype == np.uint8 and out.flags.c_contiguous and out.flags.writeable
        assert np.array_equal(out, expected) and not np.shares_memory(out, chw.numpy())


@pytest.mark.parametrize("shape", [(512, 512), (583, 501), (300, 900), (17, 9), (224, 224)])
def test_pixel_transform_matches_open_clip_pil_transform(shape) -> None:
    compose = open_clip.image_transform(224, is_train=False)
    transform = PixelTransform.from_compose(compose)
    assert transform is not None
    image = _photo(*shape, seed=shape[0])
    ours = transform([image])[0]
    reference = compose(Image.fromarray(image))
    assert ours.shape == reference.shape == (3, 224, 224) and ours.dtype == torch.float32
    # one grey level, after the Normalize step's division by the smallest std
    one_level = 1 / 255 / min(compose.transforms[-1].std) + 1e-6
    diff = (ours - reference).abs()
    assert diff.max().item() <= one_level and diff.mean().item() < 0.05 * one_level


def test_fused_scale_normalize_equals_to_tensor_then_normalize() -> None:
    compose = open_clip.image_transform(224, is_train=False)
    transform = PixelTransform.from_compose(compose)
    assert len(transform.steps) == 3  # resize, centre crop, and ToTensor + Normalize fused into one step
    images = [_photo(300, 260, seed=1), _photo(224, 224, seed=2), _photo(500, 230, seed=3)]
    batch = transform(images)
    for image, ours in zip(images, batch, strict=True):
        x = as_chw_tensor(image)
        for step in transform.steps[:-1]:
            x = step(x)
        reference = compose.transforms[-1](x[0].double() / 255)  # torchvision's Normalize, in float64
        assert (ours.double() - reference).abs().max().item() < 1e-5
    # without a Normalize (or with an in-place one) the steps run as they are
    plain = PixelTransform.from_compose(T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()]))
    image = _photo(40, 64, seed=4)
    x = plain.steps[1](plain.steps[0](as_chw_tensor(image)))
    assert torch.equal(plain([image])[0], x[0].float() / 255)
    with pytest.raises(ValueError, match="no images"):
        plain([])


def test_pixel_transform_refuses_steps_it_cannot_translate() -> None:
    compose = T.Compose([T.Resize(32), T.Lambda(lambda im: im), T.ToTensor()])
    assert PixelTransform.from_compose(compose) is None
    assert PixelTransform.from_compose(T.Compose([T.Resize(32, interpolation=T.InterpolationMode.NEAREST),
                                                  T.ToTensor()])) is None
    assert PixelTransform.from_compose(T.Compose([T.Resize(32)])) is None  # no ToTensor: not a model input


@pytest.mark.parametrize(("shape", "size"), [((61, 37), (13, 17)), ((100, 100), (7, 9)), ((7, 9), (100, 131)),
                                             ((512, 384), (64, 48))])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, bool])
def test_label_resize_picks_the_pixel_under_each_output_centre(shape, size, dtype):
    """Nearest neighbour against an independent index computation (output pixel centres mapped back)."""
    from spatext.pipeline.resize import resize_labels

    labels = np.random.default_rng(0).integers(0, 2 if dtype is bool else 200_000 if dtype is np.int32 else 256,
                                               shape).astype(dtype)
    rows = np.floor((np.arange(size[0]) + 0.5) * shape[0] / size[0]).astype(int)
    cols = np.floor((np.arange(size[1]) + 0.5) * shape[1] / size[1]).astype(int)
    out = resize_labels(labels, size)
    assert out.dtype == labels.dtype and out.shape == size
    np.testing.assert_array_equal(out, labels[rows[:, None], cols[None, :]])
