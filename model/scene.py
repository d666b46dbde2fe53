"""Scenes: a global prompt plus regions, each a mask with a local prompt; their file forms and rasterisation.

File forms (coordinates are fractions of the image, x to the right, y down, both in [0, 1]):

- scene JSON: ``{"prompt": "...", "regions": [{"prompt": "...", "box": [x0, y0, x1, y1]},
  {"prompt": "...", "polygon": [[x, y], ...]}, {"prompt": "...", "mask": "m.png"}]}``; a mask PNG is relative to the
  JSON file, inside where its grey level is >= 128 (1 in a mask of 0s and 1s; with an alpha channel, only where it is
  opaque);
- painted scene: a colour-painted PNG + ``{"prompt": "...", "colors": {"#rrggbb": "local prompt", ...},
  "background": ["#000000", "#ffffff"]}``; ``background`` is optional (default black, white and transparent pixels,
  unless ``colors`` maps them); any other colour is an error (paint without anti-aliasing).

A pixel belongs to a box or polygon when its centre lies inside. Overlaps resolve in list order: a later region is
drawn on top of an earlier one. A region with no pixel at a given size is an error, never silently dropped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from spatext.paths import leaves
from spatext.pipeline.image_formats import OPEN_IMAGE_FORMATS
from spatext.pipeline.resize import resize_labels

logger = logging.getLogger(__name__)

SHAPE_KEYS = ("box", "polygon", "mask")
DEFAULT_BACKGROUND = ("#000000", "#ffffff")
MAX_SCENE_PIXELS = 4096 * 4096  # a mask or painted PNG over this is refused from its header (a few hundred KB of PNG
# can declare 13000 x 13000 pixels: 3.5 GB once decoded and converted); scenes are resized to the model's size anyway


class Region(NamedTuple):
    """One region: a mask (H x W, bool, or float in [0, 1] with > 0.5 inside) and its local prompt."""

    mask: np.ndarray
    prompt: str


@dataclass
class Scene:
    """A global prompt and regions in list order (later regions on top of earlier ones where they overlap).

    ``source`` names where the scene came from (the scene file; empty when built in code), so that an error found
    later, e.g. a region without a pixel at the model's resolution, can name the file to fix.
    """

    prompt: str = ""
    regions: list[Region] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        """Normalise (mask, prompt) pairs into boolean-mask ``Region``s and check them."""
        if not isinstance(self.prompt, str):
            raise ValueError(f"scene prompt must be a string, got {type(self.prompt).__name__}")
        regions = []
        for i, region in enumerate(self.regions):
            if not isinstance(region, (tuple, list)) or len(region) != 2:
                raise ValueError(f"regions[{i}] must be a (mask, prompt) pair, got {type(region).__name__}")
            mask, prompt = region
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"regions[{i}]: the local prompt must be a non-empty string, got {prompt!r}")
            regions.append(Region(_as_bool_mask(mask, f"regions[{i}] ({prompt!r})"), prompt))
        self.regions = regions

    @property
    def prompts(self) -> list[str]:
        """The local prompts, in region order."""
        return [r.prompt for r in self.regions]


def _as_bool_mask(mask: Any, label: str) -> np.ndarray:
    """A 2-D boolean mask from a bool / float / int array or tensor (float: > 0.5 is inside; int: non-zero), or a PIL
    image (read as a mask file is: `_pil_mask`)."""
    if isinstance(mask, Image.Image):
        return _pil_mask(mask, f"{label}: mask image")
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2 or 0 in mask.shape:
        raise ValueError(f"{label}: the mask must be a non-empty H x W array, got shape {mask.shape}")
    if mask.dtype == bool:
        return mask
    if np.issubdtype(mask.dtype, np.floating):
        return mask > 0.5
    if np.issubdtype(mask.dtype, np.integer):
        return mask != 0
    raise ValueError(f"{label}: the mask must be bool, float or int, got {mask.dtype}")


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a boolean mask to ``size`` (height, width)."""
    return resize_labels(mask.astype(bool, copy=False), size)


def rasterise(scene: Scene, size: tuple[int, int], check: bool = True) -> np.ndarray:
    """The index map (height x width, int64) of ``scene``: 0 = no region, i = ``scene.regions[i - 1]``, later on top.

    Masks of another size are resized (nearest). Raises ValueError when a region has no pixel in the map (unless
    ``check`` is False: the caller asks which regions survive).
    """
    height, width = _check_size(size)
    index_map = np.zeros((height, width), dtype=np.int64)
    for i, region in enumerate(scene.regions, start=1):
        index_map[_resize_mask(region.mask, (height, width))] = i
    if check:
        check_regions_visible(index_map, scene, f"{height}x{width}")
    return index_map


def check_regions_visible(index_map: np.ndarray | torch.Tensor, scene: Scene, resolution: str) -> None:
    """Raise ValueError naming the scene (its file, when it has one) and its first region with no pixel in
    ``index_map``."""
    values = index_map.unique().tolist() if isinstance(index_map, torch.Tensor) else np.unique(index_map).tolist()
    present = set(values)
    for i, region in enumerate(scene.regions, start=1):
        if i not in present:
            raise ValueError(
                f"{scene.source or 'scene'}: regions[{i - 1}] ({region.prompt!r}) has no pixel at {resolution} "
                "(too small, or covered by later regions); enlarge or reorder it"
            )


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    """``size`` as (height, width) of positive ints."""
    if len(size) != 2 or min(int(s) for s in size) < 1:
        raise ValueError(f"size must be (height, width) with positive values, got {size!r}")
    return int(size[0]), int(size[1])


def _fractions(values: Any, count: int | None, label: str) -> list[float]:
    """A flat list of numbers in [0, 1] (``count`` of them when given)."""
    if not isinstance(values, list) or (count is not None and len(values) != count):
        raise ValueError(f"{label}: expected a list of {count or 'some'} numbers, got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{label}: expected numbers, got {v!r}")
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{label}: coordinates are fractions of the image in [0, 1], got {v}")
    return [float(v) for v in values]


def _pixel_centres(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The x and y fractions of the pixel centres (broadcastable H x W)."""
    height, width = size
    xs = (np.arange(width) + 0.5) / width
    ys = (np.arange(height) + 0.5) / height
    return xs[None, :], ys[:, None]


def box_mask(box: Sequence[float], size: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies in [x0, x1) x [y0, y1)."""
    x0, y0, x1, y1 = box
    xs, ys = _pixel_centres(size)
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)


def polygon_mask(points: Sequence[Sequence[float]], size: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies inside the polygon, by the non-zero winding rule (SVG's default fill): a
    self-intersecting outline such as a five-point star is filled, its centre included (the even-odd rule leaves the
    centre pentagon out)."""
    xs, ys = _pixel_centres(size)
    winding = np.zeros(size, dtype=np.int32)
    for (xa, ya), (xb, yb) in zip(points, [*points[1:], points[0]], strict=True):
        if ya == yb:
            continue
        crosses = (ys >= min(ya, yb)) & (ys < max(ya, yb))
        x_at = xa + (ys - ya) * (xb - xa) / (yb - ya)
        winding += np.where(crosses & (xs < x_at), 1 if yb > ya else -1, 0).astype(np.int32)
    return winding != 0


def warn_if_stretched(path: str, image_size: tuple[int, int], size: tuple[int, int]) -> bool:
    """Warn (and return True) when a mask or painted PNG of (W, H) `image_size` is resized to (H, W) `size` of
    another aspect ratio (beyond 1%): it is stretched to fit, since scene coordinates are fractions of the image."""
    width, height = image_size
    ratio = (width / height) / (size[1] / size[0])
    if abs(ratio - 1) <= 0.01:
        return False
    logger.warning("%s is %dx%d but the image is %dx%d (width x height): its layout is stretched to fit", path, width,
                   height, size[1], size[0])
    return True


def _pil_mask(image: Image.Image, where: str) -> np.ndarray:
    """A mask image as a boolean mask of its own size, the one rule for mask files and PIL masks given in code: grey
    >= 128 is inside, or 1 in a mask of 0s and 1s only (as `mask.astype(np.uint8)` saves it); transparent pixels are
    outside. A mask whose brightest grey is below 128 (and not a 0/1 mask) is an error that says so: it would have no
    pixel inside."""
    grey = np.asarray(image.convert("L"))
    brightest = int(grey.max())
    if brightest != 1 and brightest < 128:
        raise ValueError(f"{where}: its brightest grey level is {brightest}, and a pixel is inside at >= 128: save "
                         "masks as 0/255 (white inside; 0/1 masks are read as such)")
    mask = grey >= (1 if brightest == 1 else 128)
    if "A" in image.getbands() or "transparency" in image.info:
        mask &= np.asarray(image.convert("RGBA"))[..., 3] >= 128
    return mask


def check_scene_pixels(image: Image.Image, where: str) -> None:
    """ValueError naming ``where`` when a scene image (opened, not yet decoded) has over MAX_SCENE_PIXELS pixels."""
    width, height = image.size
    if width * height > MAX_SCENE_PIXELS:
        raise ValueError(f"{where}: {width}x{height} pixels, over the {MAX_SCENE_PIXELS} a scene image may have "
                         "(draw it at a smaller size: masks are resized to the model's anyway)")


def _image_mask(path: str, size: tuple[int, int], label: str) -> np.ndarray:
    """A mask PNG (see `_pil_mask`) resized to ``size`` (nearest)."""
    if not os.path.isfile(path):
        raise ValueError(f"{label}: mask file {path!r} not found")
    try:
        with Image.open(path, formats=OPEN_IMAGE_FORMATS) as image:
            check_scene_pixels(image, f"{label}: mask {path!r}")
            image.load()
            warn_if_stretched(path, image.size, size)
            mask = _pil_mask(image, f"{label}: mask {path!r}")
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # not an image, truncated, a bomb
        raise ValueError(f"{label}: mask {path!r} is not a readable image ({e})") from e
    return np.asarray(Image.fromarray(mask).resize((size[1], size[0]), Image.Resampling.NEAREST))


def _region_mask(spec: Any, base_dir: str, size: tuple[int, int], label: str) -> tuple[np.ndarray, str]:
    """The mask and prompt of one region of a scene JSON."""
    if not isinstance(spec, dict):
        raise ValueError(f"{label}: expected an object, got {spec!r}")
    unknown = sorted(set(spec) - {"prompt", *SHAPE_KEYS})
    if unknown:
        raise ValueError(f"{label}: unknown keys {unknown}; a region has 'prompt' and one of {', '.join(SHAPE_KEYS)}")
    shapes = [k for k in SHAPE_KEYS if k in spec]
    if len(shapes) != 1:
        raise ValueError(f"{label}: give exactly one of {', '.join(SHAPE_KEYS)}, got {shapes or 'none'}")
    prompt = spec.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{label}: 'prompt' must be a non-empty string, got {prompt!r}")
    label = f"{label} ({prompt!r})"
    value = spec[shapes[0]]
    if shapes[0] == "box":
        x0, y0, x1, y1 = _fractions(value, 4, f"{label}.box")
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"{label}.box: expected x0 < x1 and y0 < y1, got {value}")
        return box_mask((x0, y0, x1, y1), size), prompt
    if shapes[0] == "polygon":
        if not isinstance(value, list) or len(value) < 3:
            raise ValueError(f"{label}.polygon: expected a list of at least 3 [x, y] points, got {value!r}")
        points = [_fractions(p, 2, f"{label}.polygon[{j}]") for j, p in enumerate(value)]
        return polygon_mask(points, size), prompt
    if not isinstance(value, str):
        raise ValueError(f"{label}.mask: expected a PNG path relative to the scene file, got {value!r}")
    if leaves(base_dir or os.curdir, value):  # a scene from elsewhere must not read (and draw) files outside its folder
        raise ValueError(f"{label}.mask: {value!r} is not a path inside the scene file's folder (absolute, '..' or a "
                         "symlink out)")
    return _image_mask(os.path.join(base_dir, value), size, label), prompt


def _read_json(path: str, allowed: set[str]) -> dict:
    """A JSON object from ``path`` with only ``allowed`` top-level keys."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # a PNG passed as --scene, UTF-16 JSON, nesting too deep
        raise ValueError(f"{path}: cannot read a scene from it ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; expected {', '.join(sorted(allowed))}")
    if not isinstance(data.get("prompt", ""), str):
        raise ValueError(f"{path}: 'prompt' must be a string")
    return data


def load_scene(path: str, size: tuple[int, int]) -> Scene:
    """Read a scene JSON (boxes, polygons, mask PNGs) with masks at ``size`` (height, width)."""
    size = _check_size(size)
    data = _read_json(path, {"prompt", "regions"})
    regions = data.get("regions", [])
    if not isinstance(regions, list):
        raise ValueError(f"{path}: 'regions' must be a list")
    base_dir = os.path.dirname(os.path.abspath(path))
    masks = [_region_mask(spec, base_dir, size, f"{path}: regions[{i}]") for i, spec in enumerate(regions)]
    scene = Scene(data.get("prompt", ""), [Region(mask, prompt) for mask, prompt in masks], path)
    for i, region in enumerate(scene.regions):
        if not region.mask.any():
            raise ValueError(f"{path}: regions[{i}] ({region.prompt!r}) has no pixel at {size[0]}x{size[1]}")
    return scene


def parse_color(value: Any, label: str) -> tuple[int, int, int]:
    """``"#rrggbb"`` → (r, g, b)."""
    text = value.strip().lower() if isinstance(value, str) else ""
    if len(text) != 7 or text[0] != "#" or any(c not in "0123456789abcdef" for c in text[1:]):
        raise ValueError(f"{label}: colours are written '#rrggbb', got {value!r}")
    return int(text[1:3], 16), int(text[3:5], 16), int(text[5:7], 16)


def _painted_colors(data: dict, path: str) -> tuple[list[tuple[tuple[int, int, int], str]], set]:
    """The (colour, prompt) pairs in order and the background colours of a painted-scene mapping."""
    colors = data.get("colors")
    if not isinstance(colors, dict) or not colors:
        raise ValueError(f"{path}: 'colors' must be a non-empty object mapping '#rrggbb' to a local prompt")
    pairs, keys = [], {}
    for key, prompt in colors.items():
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}: colors[{key!r}] must be a non-empty prompt, got {prompt!r}")
        color = parse_color(key, f"{path}: colors")
        if color in keys:  # '#FF0000' and '#ff0000': one colour, two prompts
            raise ValueError(f"{path}: colors {keys[color]!r} and {key!r} are the same colour")
        keys[color] = key
        pairs.append((color, prompt))
    background = data.get("background", list(DEFAULT_BACKGROUND))
    background = [background] if isinstance(background, str) else background
    if not isinstance(background, list):
        raise ValueError(f"{path}: 'background' must be a colour or a list of colours")
    mapped = {c for c, _ in pairs}
    explicit = "background" in data
    bg = {parse_color(c, f"{path}: background") for c in background}
    return pairs, (bg if explicit else bg - mapped)


def load_painted_scene(png: str, mapping_json: str, size: tuple[int, int]) -> Scene:
    """Read a colour-painted PNG and its colour → prompt JSON as a scene with masks at ``size`` (height, width)."""
    size = _check_size(size)
    data = _read_json(mapping_json, {"prompt", "colors", "background"})
    pairs, background = _painted_colors(data, mapping_json)
    try:
        with Image.open(png, formats=OPEN_IMAGE_FORMATS) as image:
            check_scene_pixels(image, png)
            image.load()
            warn_if_stretched(png, image.size, size)
            rgba = np.asarray(image.convert("RGBA").resize((size[1], size[0]), Image.Resampling.NEAREST))
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{png}: cannot read the painted scene ({e})") from e
    rgb = rgba[..., :3].astype(np.int64)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    opaque = rgba[..., 3] >= 128
    masks = [(codes == (r << 16 | g << 8 | b)) & opaque for (r, g, b), _ in pairs]
    known = ~opaque
    for r, g, b in background:
        known |= codes == (r << 16 | g << 8 | b)
    for mask in masks:
        known |= mask
    # unknown colours first: anti-aliased or JPEG near-colours are the usual reason a mapped colour has no pixel
    if not known.all():
        values, counts = np.unique(codes[~known], return_counts=True)
        order = np.argsort(-counts, kind="stable")
        worst = [f"#{int(values[i]):06x} ({int(counts[i])} px)" for i in order]
        raise ValueError(
            f"{png}: colours not in {mapping_json} nor background: {', '.join(worst[:5])}"
            f"{' …' if len(worst) > 5 else ''} (paint with exact colours, without anti-aliasing)"
        )
    for ((r, g, b), prompt), mask in zip(pairs, masks, strict=True):
        if not mask.any():
            raise ValueError(f"{png}: colour #{r:02x}{g:02x}{b:02x} ({prompt!r}) has no pixel at {size[0]}x{size[1]}")
    return Scene(data.get("prompt", ""), [Region(mask, prompt) for (_, prompt), mask in zip(pairs, masks, strict=True)],
                 png)
