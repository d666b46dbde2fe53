"""Decoding and cropping one shard row for training: the image and its segment map get the same centred square box,
resized to R x R (see data.py, steps 4-5), and the segments the crop keeps are renumbered."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from spatext.model.st import downsample_label_map
from spatext.pipeline.image_formats import OPEN_IMAGE_FORMATS, OPEN_MAP_FORMATS
from spatext.pipeline.resize import resize_chw


def crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square of the shorter side: the crop that 'shorter side to R, centre crop' takes."""
    side = min(width, height)
    x0, y0 = (width - side) // 2, (height - side) // 2
    return x0, y0, x0 + side, y0 + side


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread, restoring the count after (a process-wide setting: use it only from the
    thread that iterates the dataset). One image is too small to split: on a busy 2-core machine a 256 px resize took
    2.0 ms on 2 threads and 0.31 ms on one (measured). DataLoader workers already run on one thread."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def is_jpeg(data: bytes) -> bool:
    """Whether encoded image bytes are a JPEG (SOI marker)."""
    return data[:3] == b"\xff\xd8\xff"


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (DHT, JPG, DAC are not)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, found by walking its marker segments; None when there is none
    before the data ends (the decoder then reports the file as broken)."""
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF:
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if marker == 0xDA:  # start of scan without a frame header: broken
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def check_pixels(size: tuple[int, int]) -> None:
    """Refuse, before torchvision decodes it (its decoders have no guard), an image whose header declares more than
    twice ``PIL.Image.MAX_IMAGE_PIXELS``: PIL's own rule (its ``DecompressionBombError``) for what it opens, so both
    decoding paths refuse the same images."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > 2 * limit:
        raise ValueError(f"image of {size[0]} x {size[1]} pixels is over twice the {limit:,}-pixel limit "
                         "(PIL.Image.MAX_IMAGE_PIXELS): refused as a possible decompression bomb")


# Reduced-scale decoding pays from 1/4 on: Huffman decoding, which scaling does not shrink, dominates, and PIL's
# decode + resize at 1/2 took 0.95 ms vs 0.85 ms for torchvision's full decode + torch's resize (1/4: 0.64 vs 0.82 ms,
# 1/8: 0.52 vs 0.77 ms; 512 px JPEGs, measured on this 2-core machine).
MIN_DCT_SCALE = 4


def dct_scale(size: tuple[int, int], box: tuple[int, int, int, int], resolution: int) -> int:
    """The factor (1, 2, 4 or 8) by which a JPEG of `size` (W, H) can be decoded when `box` is resized to R x R: the
    largest DCT scale that keeps >= R pixels across the box (PIL's `draft` rule)."""
    side = box[2] - box[0]
    if side <= resolution:
        return 1
    want = (max(1, size[0] * resolution // side), max(1, size[1] * resolution // side))
    scale = min(size[0] // want[0], size[1] // want[1])
    return next(a for a in (8, 4, 2, 1) if scale >= a)


def decode_rgb(data: bytes, expected: tuple[int, int] | None = None) -> torch.Tensor:
    """Image bytes -> 3 x H x W uint8 RGB tensor (channels-last memory for JPEG): torchvision for a JPEG whose frame
    header ``jpeg_size`` finds (checked by ``check_pixels``), else PIL (a JPEG with stray bytes or odd markers before
    its frame header, which libjpeg would decode at a size unchecked; PIL checks what it opens). With ``expected``
    (its segment map's (W, H)), an image of another size is refused from its header, before any pixel is decoded."""
    size = jpeg_size(data) if is_jpeg(data) else None
    if size is not None:
        check_same_size(size, expected)
        check_pixels(size)
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    with Image.open(io.BytesIO(data), formats=OPEN_IMAGE_FORMATS) as im:
        check_same_size(im.size, expected)
        return torch.from_numpy(np.array(im if im.mode == "RGB" else im.convert("RGB"))).permute(2, 0, 1)


def check_same_size(size: tuple[int, int], expected: tuple[int, int] | None) -> None:
    """ValueError when an image's (W, H) is not its segment map's (``expected``; None: not checked)."""
    if expected is not None and tuple(size) != tuple(expected):
        raise ValueError(f"image is {size[0]}x{size[1]} but its segment map is {expected[0]}x{expected[1]}")


def channels_last(image: torch.Tensor) -> torch.Tensor:
    """A 3 x H x W tensor in channels-last memory (an H x W x 3 buffer): itself when it already lies so, else a
    copy. The loader keeps pixels in this layout from the decoder to the device (see `to_model_input`)."""
    if image.permute(1, 2, 0).is_contiguous():
        return image
    return image.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def resize_crop(image: torch.Tensor, box: tuple[int, int, int, int], resolution: int) -> torch.Tensor:
    """Crop `box` of a 3 x H x W uint8 image and resize it to 3 x R x R uint8 in channels-last memory, bilinear with
    antialiasing (torch's port of PIL's filter; pixels outside the box are not read). A box R pixels across is
    only cropped (a compact copy).

    The box is first copied to a compact channels-last buffer and resized in that layout, which torch's uint8
    kernel does fastest: 0.33 ms per ~400 px box to 512 px, against 0.70 ms from the strided crop view to planar
    memory (0.57 ms when only the output is converted to planar afterwards; measured). The copy pays even where
    the box's view is channels-last contiguous already (a box of whole rows): resized from that view (its own
    offset and batch stride), a 440 px box took 1.50 ms, not 0.34 ms (measured).
    """
    x0, y0, x1, y1 = box
    with single_thread():
        crop = torch.empty((1, 3, y1 - y0, x1 - x0), dtype=torch.uint8, memory_format=torch.channels_last)
        crop.copy_(image[None, :, y0:y1, x0:x1])
        return channels_last(resize_chw(crop, (resolution, resolution), mode="bilinear")[0])


def load_image_crop(
    data: bytes, box: tuple[int, int, int, int], resolution: int, size: tuple[int, int]
) -> torch.Tensor:
    """Decode image bytes and resize `box` (original pixel coordinates) to a 3 x R x R uint8 RGB tensor, bilinear.

    A JPEG with `dct_scale` >= `MIN_DCT_SCALE` is decoded at that reduced DCT scale (PIL's `draft`) and resized by
    PIL with the box rescaled by the exact scale, so the result stays aligned with the segment map; any other image
    is decoded in full and resized by `resize_crop`. `size` is the expected (W, H).
    """
    if not (is_jpeg(data) and dct_scale(size, box, resolution) >= MIN_DCT_SCALE):
        image = decode_rgb(data, expected=size)
        check_same_size((image.shape[2], image.shape[1]), size)  # as decoded, should libjpeg read another header
        return resize_crop(image, box, resolution)
    with Image.open(io.BytesIO(data), formats=OPEN_IMAGE_FORMATS) as im:
        check_same_size(im.size, size)
        side = box[2] - box[0]
        drafted = im.draft("RGB", (max(1, size[0] * resolution // side), max(1, size[1] * resolution // side)))
        scale = size[0] / drafted[1][2] if drafted is not None else 1.0  # None: PIL could not draft this file
        small = im.resize((resolution, resolution), Image.Resampling.BILINEAR, box=tuple(v / scale for v in box))
        return torch.from_numpy(np.array(small)).permute(2, 0, 1)  # channels-last, like resize_crop


def load_label_crop(
    data: bytes, resolution: int, segments: np.ndarray | None = None, max_side: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode a stored segment map (single-channel PNG) and resize its `crop_box` to R x R, nearest; returns the
    mode-L label image and the map's (W, H). When reducing, a segment with at least one output pixel's worth of
    area is never lost (see `keep_small_segments`; `segments`: the map's stored indices, when known). A map whose
    longest side is over `max_side` (the shards' image_size) is refused from its header: a few hundred KB of PNG can
    declare 13000 x 13000 pixels, which the reduction would turn into gigabytes."""
    with Image.open(io.BytesIO(data), formats=OPEN_MAP_FORMATS) as im:
        if max_side is not None and max(im.size) > max_side:
            raise ValueError(f"segment_map is {im.size[0]}x{im.size[1]}, over the shards' image_size {max_side}")
        if im.mode != "L":
            raise ValueError(f"segment_map must be a single-channel (L) PNG, got mode {im.mode}")
        box = crop_box(*im.size)
        small = im.resize((resolution, resolution), Image.Resampling.NEAREST, box=box)
        if box[2] - box[0] > resolution:
            small = keep_small_segments(im, box, small, segments)
        return small, im.size


def keep_small_segments(
    im: Image.Image, box: tuple[int, int, int, int], small: Image.Image, segments: np.ndarray | None = None
) -> Image.Image:
    """`small` (the nearest-neighbour reduction of `box` of the label image `im`), or, where nearest sampling stepped
    over a segment with at least one output pixel's worth of area in the box (a thin pole, a wire), the reduction by
    `downsample_label_map` instead: per-pixel majority, small segments rescued (DESIGN.md: downsampling must not
    erase them; the same rule as ST's own reduction to the denoiser's size). With `segments` (the stored indices the
    map may hold) a map whose segments all reached `small`, the usual case, costs nothing more to check."""
    kept = np.asarray(small.histogram())
    if segments is not None and kept[np.asarray(segments, dtype=np.int64)].all():
        return small
    crop = im.crop(box)
    cell_area = (crop.size[0] / small.size[0]) * (crop.size[1] / small.size[1])
    area = np.asarray(crop.histogram())
    if not np.any((area[1:] >= cell_area) & (kept[1:] == 0)):
        return small
    labels = torch.from_numpy(np.array(crop, dtype=np.int64))[None]
    with single_thread():
        reduced = downsample_label_map(labels, (small.size[1], small.size[0]), int(np.flatnonzero(area).max()))
    return Image.fromarray(reduced[0].numpy().astype(np.uint8), "L")


def renumber(labels: np.ndarray, keep: np.ndarray, histogram: np.ndarray | None = None) -> np.ndarray:
    """H x W uint8 stored indices -> H x W uint8 with keep[i] as i + 1 and every other index as 0 (one 256-entry
    lookup table, `np.take`). Given the map's 256-bin `histogram`, a table that maps every value present to itself
    (stored indices 1..k, all kept: the usual case) returns `labels` itself instead of a copy."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[keep] = np.arange(1, len(keep) + 1)
    if histogram is not None:
        values = np.flatnonzero(histogram)
        if np.array_equal(lut[values], values):
            return labels
    return np.take(lut, labels)


def choose_segments(
    present: np.ndarray, resample: bool, max_segments: int, rng: np.random.Generator | None, key: str
) -> np.ndarray:
    """Stored indices to keep, in stored order: all present ones, or a random non-empty subset when resampling."""
    if resample and len(present):
        count = int(rng.integers(1, min(len(present), max_segments) + 1))
        return np.sort(rng.choice(present, size=count, replace=False))
    if len(present) > max_segments:
        raise ValueError(f"max_segments={max_segments} but sample {key!r} has {len(present)} segments; "
                         "raise max_segments or pass resample_segments=True")
    return present
