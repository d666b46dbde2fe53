"""Scenes: (mask, prompt) pairs, the JSON forms (box, polygon, mask PNG), painted PNGs, and rasterisation."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
from PIL import Image

from spatext.model.scene import (
    Scene,
    box_mask,
    check_regions_visible,
    load_painted_scene,
    load_scene,
    polygon_mask,
    rasterise,
)


def _write_scene(tmp_path, data: dict, name: str = "scene.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_scene_accepts_pairs_and_normalises_masks():
    float_mask = np.array([[0.2, 0.9], [0.6, 0.0]])
    scene = Scene("a park", [(float_mask, "a dog"), (np.array([[1, 0], [0, 0]]), "a ball")])
    assert scene.prompts == ["a dog", "a ball"]
    assert scene.regions[0].mask.tolist() == [[False, True], [True, False]]
    assert scene.regions[1].mask.dtype == bool
    with pytest.raises(ValueError, match=r"regions\[0\]: the local prompt"):
        Scene("x", [(float_mask, "")])
    with pytest.raises(ValueError, match=r"regions\[0\].*H x W"):
        Scene("x", [(np.zeros((2, 2, 3)), "rgb")])
    with pytest.raises(ValueError, match=r"regions\[0\] must be a \(mask, prompt\) pair"):
        Scene("x", ["just a string"])


def test_rasterise_puts_later_regions_on_top():
    a = np.zeros((4, 4), bool)
    a[:, :3] = True
    b = np.zeros((4, 4), bool)
    b[:, 2:] = True
    index = rasterise(Scene("", [(a, "left"), (b, "right")]), (4, 4))
    assert index.dtype == np.int64
    assert index.tolist() == [[1, 1, 2, 2]] * 4


def test_rasterise_rejects_a_region_covered_by_later_ones_and_resizes_masks():
    small = np.zeros((4, 4), bool)
    small[1, 1] = True
    full = np.ones((4, 4), bool)
    with pytest.raises(ValueError, match=r"regions\[0\] \('a bird'\) has no pixel at 4x4"):
        rasterise(Scene("", [(small, "a bird"), (full, "sky")]), (4, 4))
    big = np.kron(np.array([[1, 0], [0, 0]], bool), np.ones((8, 8), bool))  # 16x16, top-left quarter
    assert rasterise(Scene("", [(big, "a box")]), (4, 4)).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0] * 4, [0] * 4]
    with pytest.raises(ValueError, match=r"regions\[0\].*no pixel at 2x2"):
        check_regions_visible(np.zeros((2, 2), np.int64), Scene("", [(small, "a bird")]), "2x2")


def test_box_and_polygon_use_pixel_centres():
    assert box_mask((0.0, 0.0, 0.5, 0.25), (4, 4)).astype(int).tolist() == [[1, 1, 0, 0], [0] * 4, [0] * 4, [0] * 4]
    triangle = polygon_mask([(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)], (4, 4)).astype(int)
    assert triangle.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    square = polygon_mask([(0.25, 0.25), (0.75, 0.25), (0.75, 0.75), (0.25, 0.75)], (8, 8))
    assert np.array_equal(square, box_mask((0.25, 0.25, 0.75, 0.75), (8, 8)))


def _winding_numbers(points, size):
    """Reference: each pixel centre's winding number from the polygon's signed angles (float64, no crossing test)."""
    h, w = size
    ys, xs = np.mgrid[0:h, 0:w]
    px, py = (xs + 0.5) / w, (ys + 0.5) / h
    total = np.zeros(size)
    for (xa, ya), (xb, yb) in zip(points, [*points[1:], points[0]], strict=True):
        a = np.arctan2(ya - py, xa - px)
        b = np.arctan2(yb - py, xb - px)
        total += (b - a + np.pi) % (2 * np.pi) - np.pi
    return np.rint(total / (2 * np.pi)).astype(int)


def test_a_self_crossing_star_is_filled_by_the_nonzero_rule():
    star = [(0.5 + 0.45 * np.sin(4 * np.pi * k / 5), 0.5 - 0.45 * np.cos(4 * np.pi * k / 5)) for k in range(5)]
    mask = polygon_mask(star, (33, 33))
    winding = _winding_numbers(star, (33, 33))
    assert (np.abs(winding) == 2).any()  # the centre pentagon is wound twice: even-odd would leave it empty
    assert mask[16, 16] and np.array_equal(mask, winding != 0)
    square = [(0.25, 0.25), (0.25, 0.75), (0.75, 0.75), (0.75, 0.25)]  # either orientation fills
    assert np.array_equal(polygon_mask(square, (8, 8)), polygon_mask(square[::-1], (8, 8)))


def test_a_scene_file_that_is_not_utf8_json_is_named(tmp_path):
    png = tmp_path / "painted.png"
    Image.new("RGB", (4, 4)).save(png)
    with pytest.raises(ValueError, match=re.escape(f"{png}: cannot read a scene from it")):
        load_scene(str(png), (16, 16))


def test_load_scene_with_box_polygon_and_mask_png(tmp_path):
    mask = np.zeros((20, 20), np.uint8)
    mask[10:, 10:] = 255
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "m.png")
    path = _write_scene(tmp_path, {
        "prompt": "a beach",
        "regions": [
            {"prompt": "sky", "box": [0, 0, 1, 0.5]},
            {"prompt": "a sail", "polygon": [[0.5, 0], [1, 0], [1, 0.6]]},
            {"prompt": "a crab", "mask": "masks/m.png"},
        ],
    })
    scene = load_scene(path, (4, 4))
    assert scene.prompt == "a beach" and scene.prompts == ["sky", "a sail", "a crab"]
    assert rasterise(scene, (4, 4)).tolist() == [[1, 1, 2, 2], [1, 1, 1, 2], [0, 0, 3, 3], [0, 0, 3, 3]]


def test_mask_png_alpha_marks_outside(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:2, :, 3] = 255  # white everywhere, opaque only in the top half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    scene = load_scene(_write_scene(tmp_path, {"regions": [{"prompt": "top", "mask": "m.png"}]}), (4, 4))
    assert scene.regions[0].mask.sum(axis=1).tolist() == [4, 4, 0, 0]


def test_mask_png_of_zeros_and_ones_and_a_too_dark_mask(tmp_path):
    ones = np.zeros((4, 4), np.uint8)
    ones[1:3, :] = 1  # mask.astype(np.uint8), saved as it is
    Image.fromarray(ones).save(tmp_path / "m01.png")
    scene = load_scene(_write_scene(tmp_path, {"regions": [{"prompt": "a", "mask": "m01.png"}]}), (4, 4))
    assert scene.regions[0].mask.astype(np.uint8).tolist() == ones.tolist()
    red = np.zeros((4, 4, 3), np.uint8)
    red[1:3, :, 0] = 255  # grey level 76: never inside at >= 128
    Image.fromarray(red).save(tmp_path / "red.png")
    with pytest.raises(ValueError, match=r"red.png'?: its brightest grey level is 76.*save masks as 0/255"):
        load_scene(_write_scene(tmp_path, {"regions": [{"prompt": "a", "mask": "red.png"}]}), (4, 4))


def test_a_pil_mask_in_code_reads_as_the_same_mask_file(tmp_path):
    soft = np.zeros((8, 8), np.uint8)
    soft[:4, :4] = 255
    soft[4:6, :4] = 60  # a soft edge: outside at >= 128, as in a mask file
    Image.fromarray(soft).save(tmp_path / "m.png")
    from_file = load_scene(_write_scene(tmp_path, {"regions": [{"prompt": "a", "mask": "m.png"}]}), (8, 8))
    with Image.open(tmp_path / "m.png") as image:
        in_code = Scene("", [(image, "a")])
    assert in_code.regions[0].mask.tolist() == from_file.regions[0].mask.tolist()
    assert int(in_code.regions[0].mask.sum()) == 16
    assert Scene("", [(soft, "a")]).regions[0].mask.sum() == 24  # an integer array: non-zero is inside (documented)
    with pytest.raises(ValueError, match=r"regions\[0\] \('a'\): mask image: its brightest grey level is 60"):
        Scene("", [(Image.fromarray(np.full((4, 4), 60, np.uint8)), "a")])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"prompt": "x", "regions": [], "size": 3}, r"unknown keys \['size'\]"),
        ({"regions": [{"prompt": "a", "box": [0, 0, 1.2, 1]}]}, r"regions\[0\] \('a'\)\.box: .*\[0, 1\], got 1.2"),
        ({"regions": [{"prompt": "a", "box": [0.5, 0, 0.2, 1]}]}, "x0 < x1"),
        ({"regions": [{"prompt": "a", "polygon": [[0, 0], [1, -0.1], [1, 1]]}]}, r"polygon\[1\].*got -0.1"),
        ({"regions": [{"prompt": "a", "polygon": [[0, 0], [1, 1]]}]}, "at least 3"),
        ({"regions": [{"prompt": "a", "box": [0, 0, 1, 1], "colour": "red"}]}, r"unknown keys \['colour'\]"),
        ({"regions": [{"prompt": "a", "box": [0, 0, 1, 1], "polygon": [[0, 0], [1, 0], [0, 1]]}]}, "exactly one"),
        ({"regions": [{"box": [0, 0, 1, 1]}]}, "'prompt' must be a non-empty string"),
        ({"regions": [{"prompt": "a", "mask": "missing.png"}]}, "not found"),
        ({"regions": [{"prompt": "dot", "box": [0.1, 0.1, 0.11, 0.11]}]}, r"regions\[0\] \('dot'\) has no pixel"),
    ],
)
def test_load_scene_errors_name_the_region(tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        load_scene(_write_scene(tmp_path, data), (4, 4))


def test_a_mask_file_that_is_not_an_image_names_the_region(tmp_path):
    (tmp_path / "notpng.png").write_text("hello")
    path = _write_scene(tmp_path, {"prompt": "p", "regions": [{"prompt": "a dog", "mask": "notpng.png"}]})
    with pytest.raises(ValueError, match=r"regions\[0\] \('a dog'\): mask '.*notpng\.png' is not a readable image"):
        load_scene(path, (4, 4))


def test_load_scene_rejects_unreadable_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read a scene"):
        load_scene(str(path), (4, 4))


def _painted(tmp_path, pixels: np.ndarray, mapping: dict) -> tuple[str, str]:
    Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "painted.png")
    return str(tmp_path / "painted.png"), _write_scene(tmp_path, mapping, "colors.json")


def test_painted_scene_maps_colours_to_regions(tmp_path):
    pixels = np.full((8, 8, 3), 255)  # white canvas = background by default
    pixels[:4, :4] = (255, 0, 0)
    pixels[4:, :] = (0, 128, 0)
    colors = {"#FF0000": "a red kite", "#008000": "grass"}
    png, mapping = _painted(tmp_path, pixels, {"prompt": "a field", "colors": colors})
    scene = load_painted_scene(png, mapping, (4, 4))
    assert scene.prompt == "a field" and scene.prompts == ["a red kite", "grass"]
    assert rasterise(scene, (4, 4)).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [2] * 4, [2] * 4]


def test_painted_scene_errors(tmp_path):
    pixels = np.zeros((4, 4, 3))
    png, mapping = _painted(tmp_path, pixels, {"colors": {"#ff0000": "a kite"}})
    with pytest.raises(ValueError, match=r"colour #ff0000 \('a kite'\) has no pixel"):
        load_painted_scene(png, mapping, (4, 4))
    pixels[0, 0] = (250, 3, 3)  # the kite painted with an anti-aliased / JPEG near-colour only: that colour is named
    png, mapping = _painted(tmp_path, pixels, {"colors": {"#ff0000": "a kite"}})
    with pytest.raises(ValueError, match=r"colours not in .*#fa0303 \(1 px\).*without anti-aliasing"):
        load_painted_scene(png, mapping, (4, 4))
    pixels[1, 1] = (255, 0, 0)
    png, mapping = _painted(tmp_path, pixels, {"colors": {"#ff0000": "a kite"}})
    with pytest.raises(ValueError, match=r"colours not in .*#fa0303 \(1 px\).*without anti-aliasing"):
        load_painted_scene(png, mapping, (4, 4))
    png, mapping = _painted(tmp_path, pixels, {"colors": {"red": "a kite"}})
    with pytest.raises(ValueError, match="'#rrggbb'"):
        load_painted_scene(png, mapping, (4, 4))
    png, mapping = _painted(tmp_path, pixels, {"colours": {"#ff0000": "a kite"}})
    with pytest.raises(ValueError, match=r"unknown keys \['colours'\]"):
        load_painted_scene(png, mapping, (4, 4))
    png, mapping = _painted(tmp_path, pixels, {"colors": {"#FF0000": "a kite", "#ff0000": "a ball"}})
    with pytest.raises(ValueError, match="colors '#FF0000' and '#ff0000' are the same colour"):
        load_painted_scene(png, mapping, (4, 4))


def test_painted_scene_background_options(tmp_path):
    pixels = np.zeros((4, 4, 3))
    pixels[:2] = (0, 0, 255)
    pixels[2:, :2] = (255, 255, 255)
    mapping = {"colors": {"#ffffff": "snow", "#0000ff": "sky"}}
    png, path = _painted(tmp_path, pixels, mapping)  # white is mapped, so only black stays background
    assert rasterise(load_painted_scene(png, path, (4, 4)), (4, 4))[2:].tolist() == [[1, 1, 0, 0]] * 2
    png, path = _painted(tmp_path, pixels, {"colors": {"#0000ff": "sky"}, "background": "#000000"})
    with pytest.raises(ValueError, match="#ffffff"):  # an explicit background replaces the default
        load_painted_scene(png, path, (4, 4))


def test_a_region_lost_after_loading_names_the_scene_file(tmp_path):
    path = _write_scene(tmp_path, {"regions": [{"prompt": "a bird", "box": [0, 0, 0.25, 0.25]}]})
    scene = load_scene(path, (8, 8))  # 2 x 2 pixels at 8 x 8: visible there
    assert scene.source == path
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}: regions\[0\] \('a bird'\) has no pixel at 2x2"):
        check_regions_visible(np.zeros((2, 2), np.int64), scene, "2x2")  # e.g. at the model's resolution
    pixels = np.zeros((4, 4, 3))
    pixels[0, 0] = (255, 0, 0)
    png, mapping = _painted(tmp_path, pixels, {"colors": {"#ff0000": "a kite"}})
    assert load_painted_scene(png, mapping, (4, 4)).source == png
    with pytest.raises(ValueError, match=r"^scene: regions\[0\]"):  # built in code: no file to name
        check_regions_visible(np.zeros((2, 2), np.int64), Scene("", [(np.ones((2, 2)), "a bird")]), "2x2")


def test_a_png_of_another_aspect_ratio_is_stretched_with_a_warning(tmp_path, caplog):
    Image.fromarray(np.full((32, 128), 255, np.uint8)).save(tmp_path / "wide.png")
    path = _write_scene(tmp_path, {"regions": [{"prompt": "a", "mask": "wide.png"}]})
    with caplog.at_level(logging.WARNING, logger="spatext.model.scene"):
        assert load_scene(path, (64, 64)).regions[0].mask.all()
    assert "wide.png is 128x32 but the image is 64x64 (width x height): its layout is stretched" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatext.model.scene"):
        load_scene(path, (16, 64))  # the same aspect ratio: no warning
    assert "stretched" not in caplog.text
