"""Composition of one demo-corpus sample: background, objects, occlusion, exact ground truth and caption.

Each sample is a pure function of (index, seed): a 256-640 px background of 1-2 stuff regions (sky, grass, water,
sand, snow, wall, floor), 1-6 textured objects of 15 shape families and a 12-colour palette that occlude one
another, per-segment descriptions and a caption composed from them. The id map is exact: the image was painted
on exactly the pixels each segment owns. Drawing lives in ``demo_corpus_draw`` (shapes, textures),
``demo_corpus_scene`` (backgrounds) and ``demo_corpus_text`` (descriptions, captions); ``demo_corpus`` writes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from spatext.pipeline import demo_corpus_draw as draw
from spatext.pipeline.demo_corpus_scene import STUFF_CATEGORIES, sample_background
from spatext.pipeline.demo_corpus_text import SIZE_WORDS, ThingText, compose_caption, describe_thing

THING_CATEGORIES: tuple[str, ...] = tuple(sorted(draw.SHAPE_ASPECT))
CATEGORIES: tuple[str, ...] = tuple(sorted(THING_CATEGORIES + STUFF_CATEGORIES))
MIN_SIDE, MAX_SIDE = 256, 640
MIN_OBJECTS, MAX_OBJECTS = 1, 6
MIN_AREA_FRACTION, MAX_AREA_FRACTION = 0.002, 0.4
MIN_VISIBLE_FRACTION = 0.35  # objects with less of their shape visible are left out of the scene
MIN_VISIBLE_PIXELS = 24
MIN_COLOUR_DISTANCE = 110.0  # RGB distance between an object's colour and the background behind it
TEXTURE_WEIGHTS = {"solid": 0.4, "striped": 0.15, "dotted": 0.15, "checkered": 0.1, "shaded": 0.2}
MIN_PATTERN_SIZE = 30  # px: objects thinner than this are solid (a pattern would not show)
MIN_PATTERN_FRACTION = SIZE_WORDS[0][0]  # ... and so are the "tiny" ones


@dataclass
class CorpusSample:
    """One generated sample: image, exact panoptic ground truth (id map + segments_info) and caption."""

    key: str
    image: np.ndarray  # H x W x 3 uint8 RGB
    id_map: np.ndarray  # H x W int32; each pixel holds one segment id (0 = void, absent in practice)
    caption: str
    segments: list[dict]  # COCO-panoptic segments_info: id, category, isthing, area, bbox, description
    layout: str = ""  # outdoor | indoor | flat
    shape_areas: dict[int, int] = field(default_factory=dict)  # thing id -> pixels of its whole shape (unoccluded)


@dataclass
class _Object:
    """An object being composed: its spec and its rasterisation (window, mask and texture within the window)."""

    spec: draw.ObjectSpec
    window: tuple[int, int, int, int]
    mask: np.ndarray

    def full_mask(self, h: int, w: int) -> np.ndarray:
        """The object's mask as an H x W boolean image."""
        y0, y1, x0, x1 = self.window
        out = np.zeros((h, w), dtype=bool)
        out[y0:y1, x0:x1] = self.mask
        return out


def _geometry(rng: np.random.Generator, h: int, w: int) -> draw.ObjectSpec:
    """Random shape, size (log-uniform area fraction), rotation and position, mostly inside the image."""
    category = str(rng.choice(THING_CATEGORIES))
    params = draw.sample_shape_params(rng, category)
    fraction = float(np.exp(rng.uniform(np.log(MIN_AREA_FRACTION), np.log(MAX_AREA_FRACTION))))
    aspect = float(rng.uniform(*draw.SHAPE_ASPECT[category]))
    area = fraction * h * w / (4 * draw.fill_factor(category, params))  # = rx * ry
    rx, ry = np.sqrt(area * aspect), np.sqrt(area / aspect)
    max_rot = np.deg2rad(draw.SHAPE_MAX_ROTATION.get(category, 180.0))
    angle = float(rng.uniform(-max_rot, max_rot))
    c, s = abs(np.cos(angle)), abs(np.sin(angle))
    ex, ey = rx * c + ry * s, rx * s + ry * c
    shrink = min(1.0, 0.95 * w / (2 * ex), 0.95 * h / (2 * ey))
    rx, ry, ex, ey = rx * shrink, ry * shrink, ex * shrink, ey * shrink
    cx = rng.uniform(0.8 * ex, w - 0.8 * ex) if 1.6 * ex < w else w / 2
    cy = rng.uniform(0.8 * ey, h - 0.8 * ey) if 1.6 * ey < h else h / 2
    return draw.ObjectSpec(category, float(cx), float(cy), float(rx), float(ry), angle, params)


def _choose_colour(rng: np.random.Generator, behind: np.ndarray, used: set[str]) -> str:
    """A palette colour far from the mean background colour behind the object, preferring unused colours."""
    names = list(draw.PALETTE)
    dist = np.array([np.linalg.norm(np.asarray(draw.PALETTE[n]) - behind) for n in names])
    for pool in ([n for n, d in zip(names, dist, strict=True) if d >= MIN_COLOUR_DISTANCE and n not in used],
                 [n for n, d in zip(names, dist, strict=True) if d >= MIN_COLOUR_DISTANCE]):
        if pool:
            return str(rng.choice(pool))
    return names[int(np.argmax(dist))]


def _appearance(rng: np.random.Generator, spec: draw.ObjectSpec, colour: str, fraction: float) -> draw.ObjectSpec:
    """Add colour and texture (pattern, its direction and period) to an object's spec; tiny objects are solid."""
    minor = 2 * min(spec.rx, spec.ry)
    texture = "solid"
    if minor >= MIN_PATTERN_SIZE and fraction >= MIN_PATTERN_FRACTION:
        texture = str(rng.choice(list(TEXTURE_WEIGHTS), p=list(TEXTURE_WEIGHTS.values())))
    period = float(np.clip(minor / rng.uniform(4.0, 7.0), 5.0, 36.0))
    return dataclasses.replace(spec, colour=colour, texture=texture, period=period,
                               texture_angle=float(rng.uniform(0, np.pi)))


def _make_objects(rng: np.random.Generator, background: np.ndarray) -> list[_Object]:
    """1-6 objects, coloured against the background behind them, in drawing order (back to front)."""
    h, w = background.shape[:2]
    objects, used = [], set()
    for _ in range(int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))):
        spec = _geometry(rng, h, w)
        window, mask, _ = draw.draw_object(spec, h, w)
        y0, y1, x0, x1 = window
        behind = background[y0:y1, x0:x1][mask].mean(axis=0) if mask.any() else background.mean(axis=(0, 1))
        colour = _choose_colour(rng, behind, used)
        used.add(colour)
        objects.append(_Object(_appearance(rng, spec, colour, mask.sum() / (h * w)), window, mask))
    # Mostly larger objects behind smaller ones, with enough jitter that small ones get hidden too.
    depth = [-np.log(max(o.mask.sum(), 1)) + rng.normal(0.0, 1.0) for o in objects]
    return [objects[i] for i in np.argsort(depth, kind="stable")]


def _visible_objects(objects: list[_Object], h: int, w: int) -> tuple[list[_Object], list[tuple[int, int]]]:
    """Drop objects mostly hidden by those in front; returns the kept ones (back to front) and occlusion pairs.

    Occlusion pairs (front, back) index into the returned list. Dropping an object only uncovers the ones
    behind it, so a single front-to-back pass decides visibility exactly.
    """
    owner = np.full((h, w), -1, dtype=np.int64)  # index (into ``objects``) of the front-most kept object
    kept, pairs = [], []
    for i in reversed(range(len(objects))):
        full = objects[i].full_mask(h, w)
        drawn = int(full.sum())
        hidden = owner[full]
        visible = drawn - int((hidden >= 0).sum())
        if drawn == 0 or visible < max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * drawn):
            continue
        fronts, counts = np.unique(hidden[hidden >= 0], return_counts=True)
        pairs += [(int(f), i) for f, c in zip(fronts, counts, strict=True) if c >= 0.1 * drawn]
        owner[full & (owner < 0)] = i
        kept.append(i)
    kept.reverse()
    position = {old: new for new, old in enumerate(kept)}
    return [objects[i] for i in kept], [(position[f], position[b]) for f, b in pairs]


def _segment_info(id_map: np.ndarray, seg_id: int) -> tuple[list[int], tuple[float, float]]:
    """Bounding box [x, y, w, h] and centroid (x, y as fractions of the image) of the pixels with this id."""
    mask = id_map == seg_id
    ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    bbox = [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]
    rows, cols = np.nonzero(mask)
    h, w = id_map.shape
    return bbox, (float(cols.mean() + 0.5) / w, float(rows.mean() + 0.5) / h)


def _paint(background: np.ndarray, stuff_masks: list[np.ndarray], objects: list[_Object]) -> tuple:
    """Paint objects back to front over the background; returns (uint8 image, id map with stuff 1.., things after)."""
    h, w = background.shape[:2]
    image = background.copy()
    id_map = np.zeros((h, w), dtype=np.int32)
    for seg_id, mask in enumerate(stuff_masks, start=1):
        id_map[mask] = seg_id
    for seg_id, obj in enumerate(objects, start=len(stuff_masks) + 1):
        y0, y1, x0, x1 = obj.window
        u, v = draw.object_frame(obj.spec, obj.window)
        image[y0:y1, x0:x1][obj.mask] = draw.texture_rgb(obj.spec, u, v)[obj.mask]
        id_map[y0:y1, x0:x1][obj.mask] = seg_id
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), id_map


def generate_sample(index: int, seed: int) -> CorpusSample:
    """Generate sample ``index`` of the corpus with ``seed``; a pure function of (index, seed)."""
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    rng = np.random.default_rng([seed, index])
    # 1. Canvas size (each side 256-640 px, so aspect ratios from 0.4 to 2.5).
    h, w = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    # 2. Background: 1-2 stuff regions that cover the image.
    layout, regions = sample_background(rng, h, w)
    background = np.zeros((h, w, 3), dtype=np.float32)
    for region in regions:
        background[region.mask] = region.rgb[region.mask]
    # 3. Objects, back to front; those hidden too much are left out.
    objects, occlusions = _visible_objects(_make_objects(rng, background), h, w)
    # 4. Paint and number the segments: stuff first, then things in drawing order.
    image, id_map = _paint(background, [r.mask for r in regions], objects)
    # 5. Ground truth of what is visible; segments covered completely are dropped and ids renumbered.
    areas = np.bincount(id_map.ravel(), minlength=len(regions) + len(objects) + 1)
    entries = [(r.category, False, r.description, None) for r in regions]
    entries += [(o.spec.category, True, describe_thing(o.spec.category, o.spec.colour, o.spec.texture,
                                                       o.mask.sum() / (h * w)), o) for o in objects]
    remap = np.zeros(len(areas), dtype=np.int32)
    segments, things, shape_areas = [], [], {}
    for old_id, (category, isthing, description, obj) in enumerate(entries, start=1):
        if areas[old_id] == 0:
            continue
        new_id = remap[old_id] = len(segments) + 1
        bbox, centroid = _segment_info(id_map, old_id)
        segments.append({"id": new_id, "category": category, "isthing": isthing, "area": int(areas[old_id]),
                         "bbox": bbox, "description": description})
        if obj is not None:
            shape_areas[new_id] = int(obj.mask.sum())
            things.append(ThingText(new_id, category, obj.spec.colour, description, centroid))
    # 6. Caption from what is visible.
    stuff = {s["category"]: s["description"] for s in segments if not s["isthing"]}
    first_thing = len(regions) + 1
    occ = [(int(remap[f + first_thing]), int(remap[b + first_thing])) for f, b in occlusions]
    caption = compose_caption(rng, layout, stuff, things, occ)
    return CorpusSample(f"demo-{index:06d}", image, remap[id_map], caption, segments, layout, shape_areas)

