"""Backgrounds of the demo corpus: 'stuff' regions (sky, grass, water, ...) with gradients, noise and texture.

A scene's background is one of three layouts: ``outdoor`` (sky above a ground: grass, water, sand or snow, split at
a straight, tilted or hilly horizon), ``indoor`` (a wall above a floor) or ``flat`` (one surface seen from above).
Each region becomes one stuff segment; together they cover every pixel, so the id map has no void.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from spatext.pipeline.demo_corpus_draw import fractal_noise, value_noise

STUFF_CATEGORIES: tuple[str, ...] = ("floor", "grass", "sand", "sky", "snow", "wall", "water")
GROUNDS: tuple[str, ...] = ("grass", "water", "sand", "snow")
LAYOUTS: tuple[str, ...] = ("outdoor", "outdoor", "indoor", "flat")


@dataclass(frozen=True)
class StuffRegion:
    """One background region: its category, a noun phrase describing it, its pixels and its colours."""

    category: str
    description: str  # e.g. "a blue sky with white clouds", "green grass"
    mask: np.ndarray  # H x W bool
    rgb: np.ndarray  # H x W x 3 float32 (meaningful where mask is set)


def _rows(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column index grids (float32, broadcastable: (h, 1) and (1, w))."""
    return np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]


def _gradient(t: np.ndarray, stops: list[tuple[float, tuple[int, int, int]]]) -> np.ndarray:
    """Piecewise-linear colour ramp evaluated at t (any shape) -> t.shape + (3,) float32."""
    ts = [s[0] for s in stops]
    return np.stack([np.interp(t, ts, [s[1][c] for s in stops]) for c in range(3)], axis=-1).astype(np.float32)


def _tint(base: tuple[int, int, int], shade: np.ndarray) -> np.ndarray:
    """Multiply a base colour by a per-pixel brightness factor -> H x W x 3 float32."""
    return np.asarray(base, dtype=np.float32) * shade[..., None].astype(np.float32)


def _sky(rng: np.random.Generator, h: int, w: int, horizon: float) -> tuple[np.ndarray, str]:
    """Sky: clear, cloudy, sunset or night gradient above the horizon."""
    y, _ = _rows(h, w)
    t = np.broadcast_to(np.clip(y / max(horizon, 1.0), 0, 1), (h, w))
    variant = rng.choice(["clear", "cloudy", "cloudy", "sunset", "night"])
    if variant == "sunset":
        rgb = _gradient(t, [(0, (70, 45, 125)), (0.55, (215, 95, 105)), (1, (250, 185, 90))])
        return rgb, "an orange sunset sky"
    if variant == "night":
        rgb = _gradient(t, [(0, (8, 12, 40)), (1, (35, 48, 100))])
        rgb[rng.random((h, w)) < 0.002] = (255, 250, 225)
        return rgb, "a dark night sky with stars"
    rgb = _gradient(t, [(0, (40, 100, 200)), (1, (170, 210, 245))])
    rgb *= (0.97 + 0.06 * fractal_noise(rng, h, w, w / 2, octaves=2))[..., None]
    if variant == "clear":
        return rgb, "a clear blue sky"
    n = fractal_noise(rng, h, w, max(w, h) / 3, octaves=5, stretch=2.0)
    c = np.clip((n - 0.5) / 0.22, 0, 1)[..., None]
    cloud = np.asarray((250, 250, 252), np.float32) * (0.86 + 0.14 * n[..., None])
    return rgb * (1 - c) + cloud * c, "a blue sky with white clouds"


def _grass(rng: np.random.Generator, h: int, w: int, horizon: float) -> tuple[np.ndarray, str]:
    """Grass: green with coarse patches and fine vertical blades."""
    name, base = [("green grass", (70, 150, 50)), ("dark green grass", (42, 110, 40))][rng.integers(2)]
    coarse = fractal_noise(rng, h, w, min(h, w) / 3, octaves=3)
    blades = value_noise(rng, h, w, 7.0, 1.6)
    return _tint(base, (0.75 + 0.35 * coarse) * (0.82 + 0.3 * blades)), name


def _water(rng: np.random.Generator, h: int, w: int, horizon: float) -> tuple[np.ndarray, str]:
    """Water: a colour that darkens away from the horizon, with horizontal ripples and glints."""
    name, base = [("blue water", (35, 95, 180)), ("turquoise water", (25, 140, 150))][rng.integers(2)]
    y, _ = _rows(h, w)
    t = np.broadcast_to(np.clip((y - horizon) / max(h - horizon, 1.0), 0, 1), (h, w))
    shade = 1.15 - 0.35 * t
    wobble = fractal_noise(rng, h, w, w / 4, octaves=3, stretch=3.0)
    waves = np.sin(2 * np.pi * (y / (4 + 10 * t) + 1.5 * wobble))
    glint = np.clip((waves - 0.75) / 0.25, 0, 1) * (wobble > 0.35)
    rgb = _tint(base, shade * (0.92 + 0.08 * waves))
    return rgb + (np.asarray((235, 245, 255), np.float32) - rgb) * (0.55 * glint)[..., None], name


def _sand(rng: np.random.Generator, h: int, w: int, horizon: float) -> tuple[np.ndarray, str]:
    """Sand: warm beige with soft dune ripples and grain."""
    name, base = [("golden sand", (225, 190, 125)), ("pale sand", (232, 212, 168))][rng.integers(2)]
    y, x = _rows(h, w)
    fx, fy = rng.uniform(0.005, 0.02), rng.uniform(0.02, 0.05)
    dunes = np.sin(2 * np.pi * (x * fx + y * fy) + 5 * fractal_noise(rng, h, w, min(h, w) / 3, octaves=2))
    grain = rng.random((h, w), dtype=np.float32)
    return _tint(base, (0.93 + 0.06 * dunes) * (0.94 + 0.1 * grain)), name


def _snow(rng: np.random.Generator, h: int, w: int, horizon: float) -> tuple[np.ndarray, str]:
    """Snow: near-white with soft bluish drifts and a fine sparkle."""
    n = fractal_noise(rng, h, w, min(h, w) / 4, octaves=3, stretch=3.0)[..., None]
    rgb = np.asarray((246, 248, 252), np.float32) - (1 - n) * np.asarray((30, 24, 8), np.float32)
    return rgb * (0.96 + 0.05 * rng.random((h, w, 1), dtype=np.float32)), "white snow"


def _wall(rng: np.random.Generator, h: int, w: int, horizon: float) -> tuple[np.ndarray, str]:
    """Wall: a red brick bond, or a painted wall with subtle noise."""
    y, x = _rows(h, w)
    if rng.random() < 0.5:
        bh = float(rng.integers(14, 26))
        bw = bh * rng.uniform(2.0, 2.6)
        row = np.floor(y / bh)
        xs = x + (row % 2) * bw / 2
        col = np.floor(xs / bw)
        shades = rng.uniform(0.8, 1.15, size=(int(h / bh) + 2, int(w / bw) + 3)).astype(np.float32)
        shade = shades[row.astype(int), col.astype(int)] * (0.92 + 0.1 * rng.random((h, w), dtype=np.float32))
        rgb = _tint((165, 68, 48), shade)
        mortar = ((y % bh) < 2) | ((xs % bw) < 2)
        rgb[np.broadcast_to(mortar, (h, w))] = (205, 198, 188)
        return rgb, "a red brick wall"
    options = [("a beige wall", (225, 210, 180)), ("a light gray wall", (202, 202, 200)),
               ("a pale blue wall", (175, 198, 225)), ("a pale green wall", (190, 215, 180))]
    name, base = options[rng.integers(len(options))]
    shade = 1.04 - 0.1 * np.broadcast_to(y / h, (h, w)) + 0.04 * fractal_noise(rng, h, w, min(h, w) / 4, octaves=3)
    return _tint(base, shade), name


def _floor(rng: np.random.Generator, h: int, w: int, horizon: float) -> tuple[np.ndarray, str]:
    """Floor: wooden planks, or a checkerboard of tiles."""
    y, x = _rows(h, w)
    if rng.random() < 0.55:
        ph = float(rng.integers(16, 30))
        row = np.floor(y / ph)
        shades = rng.uniform(0.8, 1.15, size=int(h / ph) + 2).astype(np.float32)
        grain = value_noise(rng, h, w, 2.0, 45.0)
        shade = shades[row.astype(int)] * (0.85 + 0.25 * grain)
        shade = np.where(np.broadcast_to((y % ph) < 1.5, (h, w)), 0.55, shade)
        return _tint((150, 100, 55), shade), "a wooden floor"
    size = float(rng.integers(24, 56))
    check = ((np.floor(y / size) + np.floor(x / size)) % 2 == 1)
    if rng.random() < 0.5:
        a, b, name = (232, 232, 226), (45, 45, 50), "a black and white tiled floor"
    else:
        a, b, name = (190, 100, 68), (215, 140, 100), "a terracotta tiled floor"
    rgb = np.where(check[..., None], np.asarray(b, np.float32), np.asarray(a, np.float32))
    return rgb * (0.95 + 0.07 * rng.random((h, w, 1), dtype=np.float32)), name


PAINTERS: dict[str, Callable[[np.random.Generator, int, int, float], tuple[np.ndarray, str]]] = {
    "sky": _sky, "grass": _grass, "water": _water, "sand": _sand, "snow": _snow, "wall": _wall, "floor": _floor,
}


def _horizon(rng: np.random.Generator, h: int, w: int, lo: float, hi: float, hilly: bool) -> np.ndarray:
    """Per-column horizon row: a random level, a slight tilt, and (if hilly) rolling hills."""
    _, x = _rows(h, w)
    x = x[0]
    level = h * rng.uniform(lo, hi)
    line = np.full(w, level, dtype=np.float32)
    if hilly:
        for cycles, amp in ((rng.uniform(0.6, 1.6), 0.06), (rng.uniform(2.0, 4.0), 0.02)):
            line += h * amp * rng.uniform(0.4, 1.0) * np.sin(2 * np.pi * cycles * x / w + rng.uniform(0, 2 * np.pi))
    elif rng.random() < 0.3:
        line += (x - w / 2) * rng.uniform(-0.08, 0.08)
    return np.clip(line, 0.15 * h, 0.85 * h)


def sample_background(rng: np.random.Generator, h: int, w: int) -> tuple[str, list[StuffRegion]]:
    """Pick a layout and paint its 1-2 stuff regions; returns (layout, regions) with disjoint, covering masks."""
    layout = str(rng.choice(LAYOUTS))
    if layout == "flat":
        category = str(rng.choice(GROUNDS + ("wall", "floor")))
        rgb, name = PAINTERS[category](rng, h, w, 0.0)
        return layout, [StuffRegion(category, name, np.ones((h, w), dtype=bool), rgb)]
    if layout == "outdoor":
        upper, lower = "sky", str(rng.choice(GROUNDS))
        line = _horizon(rng, h, w, 0.3, 0.62, hilly=lower != "water" and rng.random() < 0.6)
    else:
        upper, lower = "wall", "floor"
        line = _horizon(rng, h, w, 0.55, 0.78, hilly=False)
    above = np.arange(h, dtype=np.float32)[:, None] < line[None, :]
    horizon = float(line.mean())
    regions = []
    for category, mask in ((upper, above), (lower, ~above)):
        rgb, name = PAINTERS[category](rng, h, w, horizon)
        regions.append(StuffRegion(category, name, mask, rgb))
    return layout, regions
