"""Decode stage: RawSample -> Sample (RGB array, resized) or Reject, safely.

Safe means: the pixel count is checked before any pixel is decoded (decompression bombs), EXIF orientation is
applied, any PIL mode becomes RGB (16-bit and float images scaled to 8 bits by a stated rule, ``deep_to_8bit``), and
a ground-truth id map must match the image it annotates. Downscaling is JPEG DCT scaling (``draft``) where the
reduction allows it, then an antialiased bicubic resize (``spatext.pipeline.resize``: PIL's BICUBIC to within one
grey level, several times faster).
"""

from __future__ import annotations

import io
import logging
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from spatext.pipeline.image_formats import OPEN_IMAGE_FORMATS, OPEN_MAP_FORMATS, refused_format_reason
from spatext.pipeline.panoptic import decode_id_map
from spatext.pipeline.records import REJECTS, RawSample, Reject, Sample, Segment, Segmentation
from spatext.pipeline.resize import resize_image
from spatext.pipeline.torch_threads import apply_torch_threads

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000: far above any training image, far below a bomb
MIN_SIDE = 16
DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # more than 8 bits per pixel: see deep_to_8bit


@dataclass(frozen=True)
class DecodeOptions:
    """What the decode stage needs to know."""

    image_size: int = 512  # longest side of the stored image (never upsampled)
    max_pixels: int = DEFAULT_MAX_PIXELS
    require_annotation: bool = False  # the `annotations` segmenter needs ground truth
    keep_annotation: bool = True  # False: ground truth is dropped unread (a model backend does not use it)


class DecodeError(ValueError):
    """A sample that cannot be used; `reason` is the reject reason code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def target_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(width, height) with the longest side at most `image_size`, aspect kept, never upsampled."""
    scale = min(1.0, image_size / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


# EXIF orientations that swap width and height, and the transposition each applies (what ImageOps.exif_transpose does)
SWAPPING_ORIENTATIONS = {5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                         7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def decode_image(data: bytes, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> H x W x 3 uint8 RGB, EXIF-oriented, longest side <= image_size; DecodeError if unusable."""
    return decode_image_info(data, image_size, max_pixels)[0]


def decode_image_info(
    data: bytes, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int], int]:
    """``decode_image``, plus the image's stored (W, H) before orientation and resizing, and its EXIF orientation
    (1: upright), which a ground-truth map of the same pixels must be checked against."""
    allow_pixels(max_pixels)
    try:
        with Image.open(io.BytesIO(data), formats=OPEN_IMAGE_FORMATS) as im:
            width, height = im.size  # read from the header: no pixel decoded yet
            if width * height > max_pixels:
                raise DecodeError("image_too_large", f"{width}x{height} exceeds {max_pixels} pixels")
            stored = target_size(width, height, image_size)
            if min(width, height) < MIN_SIDE or min(stored) < MIN_SIDE:  # also a thin image (2000 x 16 -> 512 x 4)
                detail = "" if min(width, height) < MIN_SIDE else f" (stored at {stored[0]}x{stored[1]})"
                raise DecodeError("image_too_small", f"{width}x{height}{detail}: sides under {MIN_SIDE} px")
            orientation = int(im.getexif().get(0x0112, 1) or 1)
            im.draft("RGB", target_size(width, height, image_size))  # JPEG: decode at a reduced scale, fast
            ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of an upright image
            if im.mode in DEEP_MODES:
                im = deep_to_8bit(im)  # LA when a 16-bit PNG marks a transparent grey
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:  # tRNS in P, L and RGB PNGs too
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            rgb = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # read-only, one copy of the pixels
        size = target_size(rgb.shape[1], rgb.shape[0], image_size)
        # Both return a new writable array (torch warns on read-only arrays downstream).
        pixels = resize_image(rgb, size) if size != (rgb.shape[1], rgb.shape[0]) else rgb.copy()
        return pixels, (width, height), orientation
    except DecodeError:
        raise
    except UnidentifiedImageError as exc:  # its message names the BytesIO object's address: not reproducible
        raise DecodeError(*refused_format_reason(data)) from exc
    except Image.DecompressionBombError as exc:  # Pillow's own check at open, above twice its MAX_IMAGE_PIXELS
        raise DecodeError("image_too_large", f"exceeds {max_pixels} pixels ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise DecodeError("unreadable_image", str(exc)) from exc


def allow_pixels(max_pixels: int) -> None:
    """Raise Pillow's decompression-bomb limit to `max_pixels` where it is lower (--max-pixels is the limit a build
    sets; Pillow's default refuses images over ~179 M pixels at open, before this module's own header check)."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def deep_to_8bit(im: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float grayscale image as 8-bit 'L' (PIL's own conversion clips to 0..255: a 16-bit
    image would turn almost white, a float one in [0, 1] black). Integer modes are read as 16-bit data, 0..65535
    -> 0..255 (what a 16-bit PNG or TIFF holds); float images in [0, 1] are scaled by 255, others in [0, 255] kept.
    DecodeError `unsupported_image_mode` for values outside those ranges (rejected, never guessed)."""
    values = np.asarray(im)
    transparent = im.info.get("transparency")
    if isinstance(transparent, int) and im.mode != "F":  # a 16-bit PNG's tRNS grey: kept as alpha, then white
        grey = deep_to_8bit(Image.fromarray(values))
        alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8), "L")
        return Image.merge("LA", (grey, alpha))
    if im.mode == "F":
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 255:
            raise DecodeError("unsupported_image_mode", "float image with values outside [0, 255] (or not finite)")
        scaled = values * 255.0 if values.max() <= 1.0 else values
        return Image.fromarray(np.rint(scaled).astype(np.uint8), "L")
    if values.min() < 0 or values.max() > 65535:
        raise DecodeError("unsupported_image_mode", f"{im.mode} image with values outside 0..65535")
    return Image.fromarray(((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8), "L")


def aspect_matches(map_size: tuple[int, int], size: tuple[int, int], tolerance: float = 0.02) -> bool:
    """Whether a map of `map_size` (W, H) fits an image resized to `size` (W, H): the aspects agree within
    `tolerance`, after allowing each side of `size` its rounding (+-0.5 px). Without that allowance small images were
    refused: a 604 x 268 map against its own image at 64 x 29 is 2.254 vs 2.207 (measured at --image-size 64)."""
    (map_w, map_h), (width, height) = map_size, size
    low = max(width - 0.5, 0.5) / (height + 0.5)
    high = (width + 0.5) / max(height - 0.5, 0.5)
    return low * (1 - tolerance) <= map_w / map_h <= high * (1 + tolerance)


def decode_annotation(
    png: bytes | None, annotation: dict | None, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS,
    stored: tuple[int, int] | None = None, orientation: int = 1,
) -> Segmentation:
    """Ground-truth id map + segments_info -> Segmentation at `size` (width, height), nearest-neighbour resized; a
    map over `max_pixels` is refused from its header, like an image.

    With `stored` (the image's (W, H) as stored) and its EXIF `orientation`, the map must have the image's own size:
    upright, or as stored when the orientation swaps the sides (then it gets the image's rotation, so both stay
    aligned); any other size is a `bad_annotation` (a map at another scale was stretched before). Without them, only
    the aspect ratio is checked against `size`."""
    if isinstance(annotation, dict) and annotation.get("error"):  # what the reader found wrong (malformed json, ...)
        raise DecodeError("bad_annotation", str(annotation["error"]))
    infos = annotation.get("segments_info") if isinstance(annotation, dict) else None
    if png is None or not isinstance(infos, list):
        raise DecodeError("missing_annotation")
    try:
        with Image.open(io.BytesIO(png), formats=OPEN_MAP_FORMATS) as im:
            width, height = im.size
            if width < 1 or height < 1:
                raise DecodeError("bad_annotation", "empty panoptic png")
            if width * height > max_pixels:
                raise DecodeError("bad_annotation", f"panoptic map {width}x{height} exceeds {max_pixels} pixels")
            rotate = None
            if stored is not None:
                upright = stored[::-1] if orientation in SWAPPING_ORIENTATIONS else stored
                if (width, height) == stored and stored != upright:  # annotated on the stored pixels
                    rotate = SWAPPING_ORIENTATIONS[orientation]
                elif (width, height) != upright:
                    raise DecodeError("bad_annotation", f"panoptic map {width}x{height} vs image "
                                      f"{upright[0]}x{upright[1]}")
            elif not aspect_matches((width, height), size):
                raise DecodeError("bad_annotation", f"panoptic map {width}x{height} vs image {size[0]}x{size[1]}")
            mapped = im.transpose(rotate) if rotate is not None else im
            # Nearest-neighbour picks whole pixels, so resizing the RGB(-encoded) map before decoding ids gives the
            # same map as resizing the ids, for fewer pixels to decode.
            id_map = decode_id_map(mapped.resize(size, Image.Resampling.NEAREST) if mapped.size != size else mapped)
    except DecodeError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DecodeError("bad_annotation", f"unreadable panoptic png: {exc}") from exc
    segments = []
    for info in infos:
        try:
            label = info.get("category") or info.get("label") or info.get("name")
            segments.append(Segment(id=int(info["id"]), label=None if label is None else str(label)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DecodeError("bad_annotation", f"bad segments_info entry: {exc}") from exc
    return Segmentation(id_map=id_map.astype(np.int32, copy=False), segments=tuple(segments))


BLANK_CATEGORIES = ("Zs", "Zl", "Zp", "Cc", "Cf")  # Unicode separators, controls (NUL, ...) and format characters
BLANK_LETTERS = frozenset("\u115f\u1160\u2800\u3164\uffa0")  # Hangul fillers, the Braille blank: letters, invisible


def is_blank(text: str) -> bool:
    """Whether text shows nothing: only white space, control and format characters (NUL, zero-width space, ...) and
    the letters that show nothing (Hangul fillers, the Braille blank)."""
    return all(c in BLANK_LETTERS or unicodedata.category(c) in BLANK_CATEGORIES for c in text)


def decode_sample(raw: RawSample, options: DecodeOptions) -> Sample:
    """RawSample -> Sample; DecodeError with a reason code when the sample is unusable."""
    if raw.image_bytes is None:
        raise DecodeError("missing_image")
    if raw.caption is None or is_blank(raw.caption):
        raise DecodeError("missing_caption")
    image, stored, orientation = decode_image_info(raw.image_bytes, options.image_size, options.max_pixels)
    annotation = None
    if options.require_annotation or (options.keep_annotation and raw.annotation_png is not None):
        try:
            annotation = decode_annotation(
                raw.annotation_png, raw.annotation, (image.shape[1], image.shape[0]), options.max_pixels, stored,
                orientation,
            )
        except DecodeError:
            if options.require_annotation:
                raise
    return Sample(key=raw.key, source=raw.source, caption=raw.caption.strip(), image=image, annotation=annotation)


class Decode(beam.DoFn):
    """RawSample -> Sample (main output) or Reject (the 'rejects' output)."""

    def __init__(self, options: DecodeOptions, torch_threads: int | None = None) -> None:
        """``torch_threads``: this worker process's torch intra-op threads (``worker_torch_threads``), set at setup:
        the first step to run torch in a worker (its resize)."""
        self.options = options
        self.torch_threads = torch_threads
        self.decoded = beam.metrics.Metrics.counter("spatext_decode", "samples_decoded")
        self.rejected = beam.metrics.Metrics.counter("spatext_decode", "rejected")
        self.threads_metric = beam.metrics.Metrics.distribution("spatext_decode", "torch_threads")

    def setup(self) -> None:
        """Set this worker process's torch threads."""
        apply_torch_threads(self.torch_threads)
        self._threads_recorded = False

    def start_bundle(self) -> None:
        """Record the torch threads once per DoFn instance (metric ``torch_threads``: min and max over workers;
        a metric needs a bundle, which setup does not run in)."""
        if not self._threads_recorded:
            self.threads_metric.update(torch.get_num_threads())
            self._threads_recorded = True

    def process(self, raw: RawSample) -> Iterator:
        try:
            sample = decode_sample(raw, self.options)
        except DecodeError as exc:
            self.rejected.inc()
            yield beam.pvalue.TaggedOutput(REJECTS, Reject(raw.key, raw.source, "decode", str(exc)))
            return
        self.decoded.inc()
        yield sample
