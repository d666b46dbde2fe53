"""Drawing primitives of the demo corpus: value noise, object shapes (boolean masks) and object textures.

Everything is vectorised numpy and a pure function of its arguments (randomness comes in as a ``Generator``).
Shapes live in a normalised object frame (u, v) in [-1, 1]^2 (v points down, as image rows do); ``object_frame``
maps image pixels into that frame, so a mask is exactly the set of pixels whose centre falls inside the shape:
no anti-aliasing, and the texture is painted on exactly those pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Named palette (RGB). Names are what descriptions and captions say.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (250, 215, 30),
    "orange": (250, 135, 20),
    "purple": (125, 50, 175),
    "pink": (250, 140, 195),
    "white": (246, 246, 246),
    "black": (22, 22, 22),
    "brown": (125, 75, 35),
    "gray": (128, 128, 128),
    "cyan": (35, 200, 220),
}

# Thing categories (object shapes) and their aspect ratio range (rx / ry of the object frame).
SHAPE_ASPECT: dict[str, tuple[float, float]] = {
    "circle": (1.0, 1.0),
    "ellipse": (1.5, 2.3),
    "square": (1.0, 1.0),
    "rectangle": (1.6, 2.8),
    "triangle": (0.95, 1.15),
    "pentagon": (1.0, 1.0),
    "hexagon": (1.0, 1.0),
    "star": (1.0, 1.0),
    "diamond": (0.55, 0.7),
    "cross": (1.0, 1.0),
    "ring": (1.0, 1.0),
    "crescent": (1.0, 1.0),
    "heart": (1.0, 1.1),
    "blob": (1.0, 1.3),
    "arrow": (1.5, 1.9),
}
# Maximum rotation (degrees) per shape: squares stay squares, not diamonds; circles need none.
SHAPE_MAX_ROTATION: dict[str, float] = {"circle": 0.0, "square": 15.0, "diamond": 10.0, "heart": 20.0}

TEXTURE_WORD: dict[str, str] = {"solid": "", "striped": "striped", "dotted": "dotted", "checkered": "checkered",
                                "shaded": "shaded"}


@dataclass(frozen=True)
class ObjectSpec:
    """One object to draw: shape, placement (centre, half-extents, rotation) and appearance."""

    category: str
    cx: float
    cy: float
    rx: float
    ry: float
    angle: float  # radians
    params: dict = field(default_factory=dict)  # shape parameters (ring hole, blob harmonics, ...)
    colour: str = "red"
    texture: str = "solid"
    texture_angle: float = 0.0
    period: float = 8.0


def value_noise(rng: np.random.Generator, h: int, w: int, cell_y: float, cell_x: float | None = None) -> np.ndarray:
    """Smooth value noise in [0, 1] of shape (h, w): random values on a grid of cells, smoothstep-interpolated."""
    cell_x = cell_y if cell_x is None else cell_x
    gh, gw = int(np.ceil(h / cell_y)) + 2, int(np.ceil(w / cell_x)) + 2
    grid = rng.random((gh, gw), dtype=np.float32)
    y = np.arange(h, dtype=np.float32) / cell_y
    x = np.arange(w, dtype=np.float32) / cell_x
    y0, x0 = y.astype(np.int64), x.astype(np.int64)
    fy, fx = y - y0, x - x0
    fy, fx = (fy * fy * (3 - 2 * fy))[:, None], (fx * fx * (3 - 2 * fx))[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def fractal_noise(
    rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 4, stretch: float = 1.0
) -> np.ndarray:
    """Sum of value-noise octaves (cell halving, amplitude halving), rescaled to [0, 1]; stretch = cell_x / cell_y."""
    total = np.zeros((h, w), dtype=np.float32)
    amplitude, norm = 1.0, 0.0
    for _ in range(octaves):
        total += amplitude * value_noise(rng, h, w, max(cell, 1.0), max(cell * stretch, 1.0))
        norm += amplitude
        amplitude, cell = amplitude / 2, cell / 2
    total /= norm
    lo, hi = float(total.min()), float(total.max())
    return (total - lo) / max(hi - lo, 1e-6)


def _polygon(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of points (u, v) against a closed polygon (N x 2 vertices)."""
    inside = np.zeros(u.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(verts, np.roll(verts, -1, axis=0), strict=True):
        if y1 == y2:
            continue
        crosses = (y1 > v) != (y2 > v)
        x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at)
    return inside


def _regular(n: int, radius: float = 1.0, start_deg: float = -90.0) -> np.ndarray:
    """Vertices of a regular n-gon (first vertex pointing up by default)."""
    a = np.deg2rad(start_deg) + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(a), radius * np.sin(a)], axis=1)


def _star_vertices(points: int, inner: float) -> np.ndarray:
    """Vertices of a star polygon alternating between radius 1 and ``inner``."""
    outer = _regular(2 * points)
    scale = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return outer * scale[:, None]


_CROSS = np.array([(-0.33, -1), (0.33, -1), (0.33, -0.33), (1, -0.33), (1, 0.33), (0.33, 0.33), (0.33, 1),
                   (-0.33, 1), (-0.33, 0.33), (-1, 0.33), (-1, -0.33), (-0.33, -0.33)], dtype=float)
_ARROW = np.array([(-1, -0.3), (0.25, -0.3), (0.25, -0.85), (1, 0), (0.25, 0.85), (0.25, 0.3), (-1, 0.3)])
_POLYGONS: dict[str, np.ndarray] = {
    "triangle": np.array([(0, -1), (1, 0.85), (-1, 0.85)], dtype=float),
    "pentagon": _regular(5),
    "hexagon": _regular(6, start_deg=0.0),
    "diamond": np.array([(0, -1), (1, 0), (0, 1), (-1, 0)], dtype=float),
    "cross": _CROSS,
    "arrow": _ARROW,
}


def sample_shape_params(rng: np.random.Generator, category: str) -> dict:
    """Random per-object shape parameters (only some shapes have any)."""
    if category == "ring":
        return {"hole": float(rng.uniform(0.45, 0.65))}
    if category == "crescent":
        return {"offset": float(rng.uniform(0.35, 0.55)), "cut": float(rng.uniform(0.8, 0.95))}
    if category == "star":
        return {"points": int(rng.choice([5, 5, 6])), "inner": float(rng.uniform(0.42, 0.5))}
    if category == "blob":
        k = np.arange(2, 6)
        return {"amps": (rng.uniform(0.05, 0.16, size=4) / (k - 1) ** 0.5).tolist(),
                "phases": rng.uniform(0, 2 * np.pi, size=4).tolist()}
    return {}


def shape_mask(category: str, u: np.ndarray, v: np.ndarray, params: dict) -> np.ndarray:
    """Boolean mask of a shape in the object frame: points (u, v) with u, v in [-1, 1] lie inside it."""
    r2 = u * u + v * v
    if category in ("circle", "ellipse"):
        return r2 <= 1.0
    if category in ("square", "rectangle"):
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if category in _POLYGONS:
        return _polygon(u, v, _POLYGONS[category])
    if category == "star":
        return _polygon(u, v, _star_vertices(params["points"], params["inner"]))
    if category == "ring":
        return (r2 <= 1.0) & (r2 >= params["hole"] ** 2)
    if category == "crescent":
        cut = (u - params["offset"]) ** 2 + (v + 0.1) ** 2 <= params["cut"] ** 2
        return (r2 <= 1.0) & ~cut
    if category == "heart":
        x, y = u * 1.15, -(v * 1.15) + 0.2  # y up; the implicit heart curve spans about [-1.14, 1.14] x [-1, 1.25]
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    if category == "blob":
        theta = np.arctan2(v, u)
        radius = np.ones_like(theta)
        for k, (amp, phase) in enumerate(zip(params["amps"], params["phases"], strict=True), start=2):
            radius += amp * np.cos(k * theta + phase)
        return np.sqrt(r2) <= radius / (1.0 + sum(params["amps"]))
    raise ValueError(f"category must be one of {sorted(SHAPE_ASPECT)}, got {category!r}")


def fill_factor(category: str, params: dict, resolution: int = 96) -> float:
    """Fraction of the object frame's square [-1, 1]^2 that the shape covers (measured on a grid)."""
    t = (np.arange(resolution) + 0.5) / resolution * 2 - 1
    u, v = np.meshgrid(t, t)
    return float(shape_mask(category, u, v, params).mean())


def object_window(spec: ObjectSpec, h: int, w: int) -> tuple[int, int, int, int]:
    """Pixel window (y0, y1, x0, x1) of the image that can contain the object, clipped to the image."""
    c, s = abs(np.cos(spec.angle)), abs(np.sin(spec.angle))
    ex, ey = spec.rx * c + spec.ry * s, spec.rx * s + spec.ry * c
    y0, y1 = max(int(np.floor(spec.cy - ey)) - 1, 0), min(int(np.ceil(spec.cy + ey)) + 2, h)
    x0, x1 = max(int(np.floor(spec.cx - ex)) - 1, 0), min(int(np.ceil(spec.cx + ex)) + 2, w)
    return y0, max(y1, y0), x0, max(x1, x0)


def object_frame(spec: ObjectSpec, window: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Rotated, scaled coordinates (u, v) of the window's pixel centres in the object's frame."""
    y0, y1, x0, x1 = window
    dy = (np.arange(y0, y1, dtype=np.float64) + 0.5 - spec.cy)[:, None]
    dx = (np.arange(x0, x1, dtype=np.float64) + 0.5 - spec.cx)[None, :]
    c, s = np.cos(spec.angle), np.sin(spec.angle)
    u = (dx * c + dy * s) / spec.rx
    v = (-dx * s + dy * c) / spec.ry
    return u, v


def secondary_colour(rgb: tuple[int, int, int]) -> np.ndarray:
    """A darker shade of a bright colour, or a lighter tint of a dark one (for stripes, dots, checks)."""
    base = np.asarray(rgb, dtype=np.float32)
    if base.mean() > 110:
        return base * 0.5
    return base + (255 - base) * 0.55


def texture_rgb(spec: ObjectSpec, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The object's colour pattern (float32 RGB, window-shaped) in its own frame, so patterns rotate with it."""
    base = np.asarray(PALETTE[spec.colour], dtype=np.float32)
    px, py = u * spec.rx, v * spec.ry  # object-frame pixel units
    ca, sa = np.cos(spec.texture_angle), np.sin(spec.texture_angle)
    along = px * ca + py * sa
    p = spec.period
    if spec.texture == "striped":
        pattern = np.floor(along / p) % 2 == 1
    elif spec.texture == "dotted":
        qx, qy = (px % p) - p / 2, (py % p) - p / 2
        pattern = qx * qx + qy * qy <= (0.3 * p) ** 2
    elif spec.texture == "checkered":
        pattern = (np.floor(px / p) + np.floor(py / p)) % 2 == 1
    elif spec.texture == "shaded":
        extent = max(spec.rx, spec.ry)
        t = np.clip((along / extent + 1) / 2, 0, 1)[..., None].astype(np.float32)
        light, dark = base + (255 - base) * 0.35, base * 0.6
        return light * (1 - t) + dark * t
    else:
        pattern = np.zeros(u.shape, dtype=bool)
    out = np.broadcast_to(base, u.shape + (3,)).copy()
    out[pattern] = secondary_colour(PALETTE[spec.colour])
    return out


def draw_object(spec: ObjectSpec, h: int, w: int) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]:
    """Rasterise one object: its window, its boolean mask in the window, and its texture (RGB) in the window."""
    window = object_window(spec, h, w)
    u, v = object_frame(spec, window)
    mask = shape_mask(spec.category, u, v, spec.params)
    return window, mask, texture_rgb(spec, u, v)
