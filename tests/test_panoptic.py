"""COCO-panoptic id maps: id = R + 256 G + 256^2 B, checked against PNGs written by PIL from known channels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from spatext.pipeline.panoptic import decode_id_map, encode_id_map


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", [None, "RGBA"])
def test_decode_follows_the_coco_formula(mode) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    want = rgb[..., 0].astype(np.int64) + 256 * rgb[..., 1].astype(np.int64) + 65536 * rgb[..., 2].astype(np.int64)
    for source in (_png(rgb, mode), Image.fromarray(rgb), rgb):
        ids = decode_id_map(source)
        assert ids.dtype == np.int32 and ids.shape == (37, 53) and ids.flags.writeable
        np.testing.assert_array_equal(ids, want)


def test_round_trip_and_errors() -> None:
    ids = np.random.default_rng(1).integers(0, 2**24, (20, 30))
    np.testing.assert_array_equal(decode_id_map(encode_id_map(ids)), ids)
    with pytest.raises(ValueError, match="must be RGB"):
        decode_id_map(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 2\*\*24\)"):
        encode_id_map(np.full((2, 2), 2**24))


def test_decode_of_palette_and_resized_maps_follows_the_coco_formula() -> None:
    """A P-mode PNG (a palette of exact RGB colours) and a map resized nearest-neighbour (as decode does before
    reading ids) give the formula's ids; ids over 2**23 (B >= 128) stay positive in int32."""
    rng = np.random.default_rng(2)
    colours = rng.integers(0, 256, (12, 3), dtype=np.uint8)
    colours[0] = (255, 255, 255)  # id 2**24 - 1
    rgb = colours[rng.integers(0, 12, (41, 29))]
    want = rgb[..., 0].astype(np.int64) + 256 * rgb[..., 1].astype(np.int64) + 65536 * rgb[..., 2].astype(np.int64)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=12)
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(decode_id_map(im), want)
    resized = Image.fromarray(rgb).resize((15, 20), Image.Resampling.NEAREST)
    np.testing.assert_array_equal(decode_id_map(resized), decode_id_map(np.asarray(resized)))
    assert decode_id_map(Image.fromarray(rgb)).min() >= 0
