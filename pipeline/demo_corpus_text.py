"""Words of the demo corpus: object descriptions ('a small striped red star') and captions composed from them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spatext.pipeline.demo_corpus_draw import TEXTURE_WORD

# Size words by the fraction of the image that the whole (unoccluded) shape covers: (upper bound, word).
SIZE_WORDS: tuple[tuple[float, str], ...] = (
    (0.006, "tiny"), (0.03, "small"), (0.1, "medium-sized"), (0.25, "large"), (float("inf"), "huge"),
)

_OUTDOOR = (
    "{objs} on {ground} under {sky}",
    "{sky} over {ground}, with {objs}",
    "{objs} with {ground} below {sky}",
    "a scene of {objs} in front of {ground} and {sky}",
)
_INDOOR = (
    "{objs} in front of {wall} above {floor}",
    "{objs} in a room with {wall} and {floor}",
    "{wall} and {floor} with {objs}",
)
_FLAT = (
    "{objs} on {bg}",
    "a top-down view of {objs} on {bg}",
    "{objs} lying on {bg}",
    "{bg} with {objs}",
)
_FLAT_WALL = (
    "{objs} on {bg}",
    "{objs} painted on {bg}",
    "{bg} with {objs}",
)


@dataclass(frozen=True)
class ThingText:
    """What the caption composer needs to know about one visible object."""

    id: int
    category: str
    colour: str
    description: str
    centroid: tuple[float, float]  # (x, y) of the visible pixels, as fractions of width and height


def article(phrase: str) -> str:
    """'a' or 'an' for the phrase that follows."""
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def size_word(area_fraction: float) -> str:
    """The size word for a shape covering ``area_fraction`` of the image."""
    return next(word for bound, word in SIZE_WORDS if area_fraction < bound)


def describe_thing(category: str, colour: str, texture: str, area_fraction: float) -> str:
    """A free-form description such as 'a small striped red star' (solid objects carry no texture word)."""
    words = " ".join(w for w in (size_word(area_fraction), TEXTURE_WORD[texture], colour, category) if w)
    return f"{article(words)} {words}"


def join_phrases(phrases: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _background_clause(rng: np.random.Generator, layout: str, stuff: dict[str, str], objs: str) -> str:
    """Place the objects phrase into a template for the scene's layout and visible stuff regions."""
    if layout == "outdoor" and len(stuff) == 2:
        ground = next(d for c, d in stuff.items() if c != "sky")
        return str(rng.choice(_OUTDOOR)).format(objs=objs, sky=stuff["sky"], ground=ground)
    if layout == "indoor" and len(stuff) == 2:
        return str(rng.choice(_INDOOR)).format(objs=objs, wall=stuff["wall"], floor=stuff["floor"])
    if not stuff:
        return objs
    templates = _FLAT_WALL if "wall" in stuff else _FLAT
    return str(rng.choice(templates)).format(objs=objs, bg=join_phrases(list(stuff.values())))


def _position_relation(a: ThingText, b: ThingText) -> str | None:
    """'the red star is to the left of the blue circle' when the centroids are clearly apart, else None."""
    dx, dy = b.centroid[0] - a.centroid[0], b.centroid[1] - a.centroid[1]
    if max(abs(dx), abs(dy)) < 0.15:
        return None
    if abs(dx) >= abs(dy):
        where = "to the left of" if dx > 0 else "to the right of"
    else:
        where = "above" if dy > 0 else "below"
    return f"the {a.colour} {a.category} is {where} the {b.colour} {b.category}"


def _relation(
    rng: np.random.Generator, things: list[ThingText], occlusions: list[tuple[int, int]]
) -> str | None:
    """One spatial or occlusion relation between two uniquely named objects, or None."""
    names = [(t.colour, t.category) for t in things]
    unique = {t.id: t for t in things if names.count((t.colour, t.category)) == 1}
    candidates = [f"the {unique[f].colour} {unique[f].category} is in front of the {unique[b].colour} "
                  f"{unique[b].category}" for f, b in occlusions if f in unique and b in unique]
    ids = sorted(unique)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            rel = _position_relation(unique[a], unique[b])
            if rel is not None:
                candidates.append(rel)
    return str(rng.choice(candidates)) if candidates else None


def compose_caption(
    rng: np.random.Generator,
    layout: str,
    stuff: dict[str, str],
    things: list[ThingText],
    occlusions: list[tuple[int, int]],
) -> str:
    """Caption: every visible object's description placed in a layout template, sometimes plus one relation."""
    order = list(rng.permutation(len(things))) if rng.random() < 0.5 else list(range(len(things)))
    caption = _background_clause(rng, layout, stuff, join_phrases([things[i].description for i in order]))
    if len(things) >= 2 and rng.random() < 0.6:
        relation = _relation(rng, things, occlusions)
        if relation:
            caption = f"{caption}; {relation}"
    return caption
