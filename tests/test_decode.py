"""Decode stage: safe decoding (EXIF, modes, bombs), resizing, ground-truth alignment, reject reasons."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import jpeg_bytes
from spatext.pipeline import decode as decode_module
from spatext.pipeline.build import decode_options_for
from spatext.pipeline.config import BuildConfig
from spatext.pipeline.decode import (
    DecodeError,
    DecodeOptions,
    aspect_matches,
    decode_annotation,
    decode_image,
    decode_sample,
    target_size,
)
from spatext.pipeline.panoptic import encode_id_map
from spatext.pipeline.records import RawSample, Reject


def test_resize_keeps_aspect_and_never_upsamples():
    assert target_size(1000, 500, 512) == (512, 256)
    assert target_size(300, 200, 512) == (300, 200)
    image = decode_image(jpeg_bytes(800, 600), image_size=400)
    assert image.shape == (300, 400, 3) and image.dtype == np.uint8
    same = decode_image(jpeg_bytes(300, 200), image_size=512)
    reference = np.asarray(Image.open(io.BytesIO(jpeg_bytes(300, 200))).convert("RGB"))
    assert np.array_equal(same, reference)  # no resize: the decoded pixels themselves
    for array in (image, same):  # the build hands these to torch, which warns on read-only arrays
        assert array.flags.writeable and array.flags.c_contiguous


def test_exif_orientation_is_applied():
    # A 60x20 image whose EXIF says "rotate 90° clockwise" (orientation 6) must come out 20 wide, 60 high.
    im = Image.new("RGB", (60, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif, quality=98)
    out = decode_image(buf.getvalue(), image_size=512)
    assert out.shape == (60, 20, 3)
    assert out[:10, :, 2].mean() > 200 and out[-10:, :, 0].mean() > 200  # the left strip is now on top


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "1", "I;16"])
def test_any_mode_becomes_rgb(mode):
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    image = decode_image(jpeg_bytes(40, 30, fmt=fmt, mode=mode), image_size=512)
    assert image.shape == (30, 40, 3) and image.dtype == np.uint8


def test_transparent_pixels_become_white():
    im = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    assert decode_image(buf.getvalue(), 512).min() == 255


@pytest.mark.parametrize("mode", ["L", "RGB", "P"])
def test_transparency_chunks_of_grey_and_rgb_pngs_become_white(mode):
    """A tRNS chunk marks one colour transparent in L and RGB PNGs as well as in palette ones."""
    im = Image.new(mode, (32, 32), 0)
    buf = io.BytesIO()
    im.save(buf, format="PNG", transparency=0 if mode != "RGB" else (0, 0, 0))
    assert Image.open(io.BytesIO(buf.getvalue())).info.get("transparency") is not None
    assert decode_image(buf.getvalue(), 512).min() == 255


def test_a_transparent_grey_of_a_16_bit_png_becomes_white():
    values = np.full((32, 32), 1000, np.uint16)
    values[:8] = 7  # the tRNS grey
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG", transparency=7)
    assert Image.open(io.BytesIO(buf.getvalue())).info.get("transparency") == 7
    image = decode_image(buf.getvalue(), 512)
    assert (image[:8] == 255).all() and (image[8:] == round(1000 * 255 / 65535)).all()


def test_an_image_whose_stored_side_would_fall_under_16_px_is_too_small():
    assert decode_image(jpeg_bytes(1024, 32), 512).shape == (16, 512, 3)  # the limit itself is kept
    for size, image_size in (((2000, 16), 512), ((16, 2000), 512), ((400, 40), 128)):
        with pytest.raises(DecodeError, match=r"image_too_small: \d+x\d+ \(stored at \d+x\d+\)") as err:
            decode_image(jpeg_bytes(*size), image_size)
        assert err.value.reason == "image_too_small"


def test_decompression_bomb_is_rejected_before_decoding():
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG")  # 81 Mpx in a tiny file
    assert len(buf.getvalue()) < 200_000
    with pytest.raises(DecodeError) as err:
        decode_image(buf.getvalue(), 512, max_pixels=64_000_000)
    assert err.value.reason == "image_too_large"


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds no pixel data (what Pillow's open reads: the header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(
        b"IEND", b"")


def test_a_header_past_pillows_own_bomb_limit_is_too_large_not_unreadable(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    with pytest.raises(DecodeError) as err:  # 900 M pixels: Pillow refuses it at open
        decode_image(_png_header(30_000, 30_000), 512)
    assert err.value.reason == "image_too_large"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns between 1x and 2x its limit
def test_max_pixels_above_pillows_limit_is_honoured(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    bomb = _png_header(20_000, 20_000)  # 400 M pixels, over Pillow's default limit (~179 M)
    with pytest.raises(DecodeError) as err:
        decode_image(bomb, 512, max_pixels=300_000_000)
    assert err.value.reason == "image_too_large" and "20000x20000 exceeds 300000000" in str(err.value)
    with pytest.raises(DecodeError) as err:  # allowed: the header passes, and the missing pixel data is the error
        decode_image(bomb, 512, max_pixels=500_000_000)
    assert err.value.reason == "unreadable_image"


def _grey_png(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (RawSample("k", "s", None, "cap"), "missing_image"),
        (RawSample("k", "s", b"x", None), "missing_caption"),
        (RawSample("k", "s", b"x", "   "), "missing_caption"),
        (RawSample("k", "s", b"x", "\x00\x00"), "missing_caption"),  # nothing visible: NUL, zero-width, BOM
        (RawSample("k", "s", b"x", "\u200b \ufeff\u00a0"), "missing_caption"),
        (RawSample("k", "s", b"x", "\u2800\u3164 \u2800"), "missing_caption"),  # Braille blank, Hangul filler
        (RawSample("k", "s", jpeg_bytes(2000, 16), "cap"), "image_too_small"),  # stored at 512 x 4
        (RawSample("k", "s", jpeg_bytes(64, 48), "cap", _grey_png(np.ones((48, 64), np.uint8)),
                   {"segments_info": [{"id": 1}]}), "bad_annotation"),  # a grey map: not the COCO RGB encoding
        (RawSample("k", "s", b"not an image", "cap"), "unreadable_image"),
        (RawSample("k", "s", jpeg_bytes(8, 8), "cap"), "image_too_small"),
        (RawSample("k", "s", jpeg_bytes(), "cap"), "missing_annotation"),
        (RawSample("k", "s", jpeg_bytes(), "cap", b"junk", {"segments_info": []}), "bad_annotation"),
        (RawSample("k", "s", jpeg_bytes(64, 48), "cap", encode_id_map(np.ones((64, 48), int)),
                   {"segments_info": [{"id": 1}]}), "bad_annotation"),
    ],
)
def test_bad_inputs_give_reason_codes(raw, reason):
    with pytest.raises(DecodeError) as err:
        decode_sample(raw, DecodeOptions(require_annotation=True))
    assert err.value.reason == reason


def test_annotation_is_resized_with_the_image():
    id_map = np.zeros((100, 200), dtype=np.int32)
    id_map[:, 100:] = 7
    raw = RawSample("k", "s", jpeg_bytes(200, 100), " a cap ", encode_id_map(id_map),
                    {"segments_info": [{"id": 7, "category": "wall"}]})
    sample = decode_sample(raw, DecodeOptions(image_size=50, require_annotation=True))
    assert sample.caption == "a cap" and sample.image.shape == (25, 50, 3)
    assert sample.annotation.id_map.shape == (25, 50)
    assert set(np.unique(sample.annotation.id_map)) == {0, 7}
    assert (sample.annotation.id_map[:, 25:] == 7).all() and (sample.annotation.id_map[:, :25] == 0).all()
    assert sample.annotation.segments[0].label == "wall"


def test_ground_truth_is_dropped_unread_for_model_segmenters(monkeypatch):
    id_map = np.zeros((48, 64), dtype=np.int32)
    id_map[:, 32:] = 7
    raw = RawSample("k", "s", jpeg_bytes(64, 48), "cap", encode_id_map(id_map), {"segments_info": [{"id": 7}]})
    assert decode_sample(raw, DecodeOptions()).annotation is not None  # kept by default

    def unexpected(*args, **kwargs):
        raise AssertionError("the ground truth was decoded")

    monkeypatch.setattr(decode_module, "decode_annotation", unexpected)
    assert decode_sample(raw, DecodeOptions(keep_annotation=False)).annotation is None  # not even read
    config = BuildConfig(input="x", output="y")
    for segmenter, require, keep in [("annotations", True, True), ("mask2former", False, False),
                                     ("detectron2", False, False), ("my_module:MySegmenter", False, True)]:
        options = decode_options_for(config, segmenter)
        assert (options.require_annotation, options.keep_annotation) == (require, keep)


def test_annotation_resize_equals_nearest_resize_of_the_ids():
    # Ids with all three bytes in play, resized 600x450 -> 512x384 (the PNG is resized before its ids are decoded).
    rng = np.random.default_rng(4)
    blocks = rng.integers(0, 2**24, size=(45, 60))
    id_map = np.kron(blocks, np.ones((10, 10), dtype=np.int64)).astype(np.int32)
    id_map[::7, ::11] = rng.integers(0, 2**24, size=id_map[::7, ::11].shape)  # single pixels too
    infos = [{"id": int(i)} for i in np.unique(id_map)]
    got = decode_annotation(encode_id_map(id_map), {"segments_info": infos}, (512, 384)).id_map
    reference = np.asarray(Image.fromarray(id_map).resize((512, 384), Image.Resampling.NEAREST))  # mode I
    assert got.dtype == np.int32 and np.array_equal(got, reference)


@pytest.mark.parametrize("image_size", [64, 32, 512])
def test_a_map_fits_its_own_image_at_any_size(image_size):
    """Each side of a resized image is rounded: a map must still fit its own image resized small (604 x 268 at 64 px
    is 64 x 29, whose aspect is 2% off), for every demo-like shape; a map of another shape does not."""
    for width, height in [(604, 268), (600, 449), (548, 377), (640, 256), (257, 640), (300, 300)]:
        size = target_size(width, height, image_size)
        assert aspect_matches((width, height), size), ((width, height), size)
        id_map = np.zeros((height, width), dtype=np.int32)
        assert decode_annotation(encode_id_map(id_map), {"segments_info": []}, size).id_map.shape == size[::-1]
    assert not aspect_matches((300, 300), target_size(604, 268, 64))
    assert not aspect_matches((604, 250), target_size(604, 268, 512))  # 7% off: another image's map


def test_oversized_annotation_map_is_rejected_before_decoding():
    buf = io.BytesIO()
    Image.new("RGB", (8000, 6000)).save(buf, format="PNG")  # 48 Mpx: over the limit below, not decoded
    with pytest.raises(DecodeError, match="panoptic map 8000x6000 exceeds"):
        decode_annotation(buf.getvalue(), {"segments_info": []}, (400, 300), max_pixels=1_000_000)


def _encoded(values: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(("values", "fmt", "expected_mode"), [
    (np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16), "PNG", "I;16"),  # 16-bit grayscale PNG
    (np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.int32), "TIFF", "I"),
    (np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32), "TIFF", "F"),  # float in [0, 1]
    (np.linspace(0, 255, 32 * 32, dtype=np.float32).reshape(32, 32), "TIFF", "F"),  # float in [0, 255]
])
def test_deep_grayscale_is_scaled_to_8_bits_not_clipped(values, fmt, expected_mode):
    data = _encoded(values, fmt)
    assert Image.open(io.BytesIO(data)).mode == expected_mode
    image = decode_image(data, 512)
    expected = np.rint(np.linspace(0, 255, 32 * 32)).reshape(32, 32)
    assert image.dtype == np.uint8 and (image[..., 0] == image[..., 2]).all()
    assert np.abs(image[..., 0].astype(int) - expected).max() <= 1  # the whole range, not all white / all black


@pytest.mark.parametrize("values", [np.full((32, 32), -5.0, np.float32), np.full((32, 32), 1e6, np.float32),
                                    np.full((32, 32), -1, np.int32)])
def test_deep_images_outside_the_stated_ranges_are_rejected(values):
    with pytest.raises(DecodeError) as err:
        decode_image(_encoded(values, "TIFF"), 512)
    assert err.value.reason == "unsupported_image_mode"


def test_reject_reasons_are_reproducible():
    with pytest.raises(DecodeError) as err:
        decode_image(b"not an image", 512)
    assert str(err.value) == ("unreadable_image: not an image in a format spatext reads (JPEG, PNG, WEBP, BMP, TIFF, "
                              "GIF)")
    ppm = io.BytesIO()
    Image.new("RGB", (8, 8)).save(ppm, "PPM")  # one Pillow reads, refused by policy: named, not "unreadable"
    with pytest.raises(DecodeError) as err:
        decode_image(ppm.getvalue(), 512)
    assert err.value.reason == "unsupported_image_format" and "looks like PPM" in str(err.value)
    for tiny in (b"", b"\x00", b"ab"):  # too short for some plugins' checks (DIB's raised struct.error)
        with pytest.raises(DecodeError) as err:
            decode_image(tiny, 512)
        assert err.value.reason == "unreadable_image"
    reject = Reject("k", "s", "embed", "embedder_error: <_io.BytesIO object at 0x7f3a12cd>, <Foo object at 0xABC1>")
    assert reject.reason == "embedder_error: <_io.BytesIO object>, <Foo object>"


def _exif_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", [6, 8])
def test_a_map_of_the_stored_pixels_turns_with_its_exif_rotated_image(orientation):
    """A map made on the stored pixels of an EXIF-rotated image (as COCO's width/height give them) gets the image's
    rotation; an upright map is taken as it is; a map of another size is a reject (it was stretched)."""
    stored = np.zeros((30, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red, as stored
    ids = np.zeros((30, 40), np.int32)
    ids[:, :20] = 1  # the same left half, as stored
    raw = RawSample("k", "s", _exif_jpeg(stored, orientation), "c", encode_id_map(ids), {"segments_info": [{"id": 1}]})
    options = DecodeOptions(image_size=512, require_annotation=True)
    sample = decode_sample(raw, options)
    red = sample.image[..., 0] > 128
    assert sample.image.shape[:2] == (40, 30) and red.mean() == pytest.approx(0.5, abs=0.05)  # turned upright
    assert np.mean((sample.annotation.id_map == 1) == red) > 0.97  # the map turned with it
    upright = np.ascontiguousarray(np.rot90(ids, 1 if orientation == 8 else -1))  # already in the upright frame
    turned = decode_sample(RawSample("k", "s", raw.image_bytes, "c", encode_id_map(upright), raw.annotation), options)
    np.testing.assert_array_equal(turned.annotation.id_map, sample.annotation.id_map)
    half = encode_id_map(ids[::2, ::2])  # a 20x15 map for a 40x30 image: same aspect, another scale
    with pytest.raises(DecodeError, match="panoptic map 20x15 vs image 30x40"):
        decode_sample(RawSample("k", "s", raw.image_bytes, "c", half, raw.annotation), options)
