"""COCO panoptic corpora (COCO / COCO-Stuff validation sets): captions json + panoptic json + PNG id maps.

Layout (as the COCO downloads unpack)::

    ROOT/annotations/panoptic_{split}.json     images, annotations (segments_info per image), categories
    ROOT/annotations/panoptic_{split}/*.png    COCO-panoptic id maps (id = R + 256 G + 256^2 B)
    ROOT/annotations/captions_{split}.json     images' captions
    ROOT/{split}/*.jpg                         images

Every image of the panoptic json becomes one sample, key ``coco-{split}-{image_id:012d}``; its caption is the first
of its captions by caption annotation id (deterministic); its ground truth is the PNG plus ``segments_info`` with the
category *name* as ``category``. An image without a caption or without a panoptic annotation still flows on, and
decode rejects it (``missing_caption`` / ``missing_annotation``), like the other readers; an image or PNG file the
json names that does not exist is a read reject naming the file.

Units of work are chunks of ``unit_images`` images in image-id order (``{panoptic json}#000003``), so ``--resume``
works. The two JSON files are loaded for the job inside a DoFn on a worker; the per-image reads come after a
Reshuffle, so they spread across workers. At launch ``find_coco`` checks the layout (``check_coco_layout``): both
folders hold files, and each JSON file is a whole JSON object (parsed there only up to LAUNCH_PARSE_BYTES). A segment
whose category id is not among ``categories`` (or a malformed annotation) makes its image a
``decode/bad_annotation`` reject when the segmenter reads the ground truth (``annotations``); a model segmenter, which
drops the ground truth unread, still gets the image.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from spatext.paths import match_in
from spatext.pipeline.read import (
    COCO_UNIT_IMAGES,
    COUNTS,
    REJECTS,
    FileRefused,
    read_optional,
    route_item,
    unencodable_label,
    unencodable_text,
)
from spatext.pipeline.records import RawSample, Reject

logger = logging.getLogger(__name__)

_PANOPTIC_JSON = re.compile(r"^panoptic_(.+)\.json$")
_WILDCARDS = "*?[{"
LAUNCH_PARSE_BYTES = 64 * 2**20  # COCO json files up to this size are parsed whole at launch (check_coco_json)


@dataclass(frozen=True)
class CocoLayout:
    """Where one split of a COCO panoptic corpus lives."""

    root: str
    split: str

    def annotation(self, name: str) -> str:
        """A path under ROOT/annotations."""
        return FileSystems.join(self.root, "annotations", name)

    @property
    def panoptic_json(self) -> str:
        """ROOT/annotations/panoptic_{split}.json"""
        return self.annotation(f"panoptic_{self.split}.json")

    @property
    def captions_json(self) -> str:
        """ROOT/annotations/captions_{split}.json"""
        return self.annotation(f"captions_{self.split}.json")

    @property
    def png_dir(self) -> str:
        """ROOT/annotations/panoptic_{split}: the PNG id maps"""
        return self.annotation(f"panoptic_{self.split}")

    @property
    def image_dir(self) -> str:
        """ROOT/{split}: the images"""
        return FileSystems.join(self.root, self.split)


def coco_key(split: str, image_id: int) -> str:
    """The sample key of a COCO image."""
    return f"coco-{split}-{image_id:012d}"


def _root_and_split(pattern: str) -> tuple[str, str | None]:
    """ROOT (and the split, when the input names ROOT/annotations/panoptic_{split}.json)."""
    path = pattern.rstrip("/")
    match = _PANOPTIC_JSON.match(posixpath.basename(path))
    if match and posixpath.basename(posixpath.dirname(path)) == "annotations":
        return posixpath.dirname(posixpath.dirname(path)), match.group(1)
    return path, None


def coco_splits(pattern: str) -> list[str]:
    """The splits with ROOT/annotations/panoptic_{split}.json under the input; [] if it is not a COCO root."""
    if any(c in pattern for c in _WILDCARDS):
        return []
    root, _ = _root_and_split(pattern)
    results = FileSystems.match([FileSystems.join(root, "annotations", "panoptic_*.json")])
    names = (posixpath.basename(m.path) for r in results for m in r.metadata_list)
    return sorted(m.group(1) for m in map(_PANOPTIC_JSON.match, names) if m)


def find_coco(pattern: str, split: str | None = None) -> CocoLayout:
    """The COCO layout of `--input` (ROOT, or ROOT/annotations/panoptic_{split}.json) and `--coco-split`."""
    root, named = _root_and_split(pattern)
    splits = coco_splits(pattern)
    if not splits:
        raise ValueError(f"--input {pattern!r}: no {FileSystems.join(root, 'annotations', 'panoptic_*.json')}; "
                         "a COCO input is ROOT with annotations/panoptic_{split}.json, annotations/panoptic_{split}/, "
                         "annotations/captions_{split}.json and {split}/")
    if split is not None and named is not None and split != named:
        raise ValueError(f"--coco-split {split!r} contradicts --input {pattern!r} (split {named!r})")
    split = split or named
    if split is None:
        if len(splits) > 1:
            raise ValueError(f"--input {pattern!r} holds several COCO splits ({', '.join(splits)}); pass --coco-split")
        split = splits[0]
    if split not in splits:
        raise ValueError(f"--coco-split {split!r}: no annotations/panoptic_{split}.json under {root!r}; "
                         f"available: {', '.join(splits)}")
    layout = CocoLayout(root, split)
    if not FileSystems.exists(layout.captions_json):
        raise ValueError(f"COCO split {split!r} needs captions: {layout.captions_json!r} does not exist")
    check_coco_layout(layout)
    return layout


def _has_a_file(folder: str) -> bool:
    """Whether `folder` holds at least one file (a glob, so object stores without real folders work too)."""
    return bool(match_in(folder, "*", limit=1))


def check_coco_layout(layout: CocoLayout) -> None:
    """Launch-time checks of what the job will read, so a missing or broken piece fails the launch (ValueError
    naming it) instead of rejecting every image mid-job as missing: the image folder and the PNG folder hold files,
    and both JSON files are whole JSON objects with the lists the reader uses."""
    for folder, what in ((layout.image_dir, "its images"), (layout.png_dir, "its panoptic PNG id maps")):
        if not _has_a_file(folder):
            raise ValueError(f"COCO split {layout.split!r} needs {what}: no file in {folder!r}")
    check_coco_json(layout.panoptic_json, ("images", "annotations", "categories"))
    check_coco_json(layout.captions_json, ("annotations",))


def check_coco_json(path: str, lists: tuple[str, ...]) -> None:
    """ValueError naming `path` unless it is a JSON object whose `lists` are lists.

    A file up to LAUNCH_PARSE_BYTES is parsed whole (a val split's files: a few MB, well under a second); a bigger
    one (train2017) only has to start with '{' and end with '}' — that catches a truncated download or a wrong file
    without loading hundreds of MB on the launcher; the worker that loads it names the file if it still fails."""
    size = match_in(path)[0].size_in_bytes
    with FileSystems.open(path) as handle:
        if size <= LAUNCH_PARSE_BYTES:
            data = _parse_coco_json(handle.read(), path)
            bad = [name for name in lists if not isinstance(data.get(name), list)]
            if bad:
                raise ValueError(f"COCO json {path!r}: {', '.join(repr(n) for n in bad)} missing or not a list")
            return
        head = handle.read(64)
        handle.seek(size - 64)
        tail = handle.read()
    if not head.lstrip().startswith(b"{") or not tail.rstrip().endswith(b"}"):
        raise ValueError(f"COCO json {path!r} ({size} bytes) is not a whole JSON object (truncated?): it starts "
                         f"{head[:16]!r} and ends {tail[-16:]!r}")


def _first_captions(captions: dict) -> dict[int, str]:
    """image id -> its caption with the smallest annotation id."""
    best: dict[int, tuple[int, str]] = {}
    for ann in captions.get("annotations", []):
        image_id, ann_id, text = ann.get("image_id"), ann.get("id"), ann.get("caption")
        if isinstance(image_id, int) and isinstance(ann_id, int) and isinstance(text, str):
            if image_id not in best or ann_id < best[image_id][0]:
                best[image_id] = (ann_id, text)
    return {image_id: text for image_id, (_, text) in best.items()}


def _segments_info(annotation: dict, categories: dict[int, dict]) -> list[dict]:
    """COCO segments_info with the category name (decode's `category`) beside the category id (every id is one of
    `categories`: `_annotation_problem` rejected the image otherwise)."""
    out = []
    for seg in annotation["segments_info"]:
        category = categories[seg.get("category_id")]
        out.append({"id": seg.get("id"), "category_id": seg.get("category_id"), "category": category.get("name"),
                    "isthing": bool(category.get("isthing", 0)), "area": seg.get("area"), "bbox": seg.get("bbox")})
    return out


def _annotation_problem(annotation: dict, categories: dict[int, dict]) -> str | None:
    """Why an image's panoptic annotation cannot be used (a reject reason), or None. A category id that `categories`
    does not define would give its segment no label, silently; it is a reject naming the id instead."""
    if not isinstance(annotation.get("file_name"), str):
        return f"malformed_annotation: file_name is {type(annotation.get('file_name')).__name__}, not a string"
    segments = annotation.get("segments_info")
    if not isinstance(segments, list) or not all(isinstance(seg, dict) for seg in segments):
        return "malformed_annotation: segments_info is not a list of objects"
    ids = [seg.get("category_id") for seg in segments]
    unknown = sorted({repr(i) for i in ids if not isinstance(i, int) or i not in categories})
    if unknown:
        return f"unknown_category: category_id {', '.join(unknown)} not in the panoptic json's categories"
    return None


def coco_index(
    panoptic: dict, captions: dict, layout: CocoLayout, unit_images: int = COCO_UNIT_IMAGES
) -> Iterator[dict | Reject]:
    """One entry {key, unit, file_name, png, caption, segments_info} per image, in image-id order; bad ones Reject."""
    categories = {c["id"]: c for c in panoptic.get("categories", []) if isinstance(c, dict) and "id" in c}
    annotations = {a.get("image_id"): a for a in panoptic.get("annotations", []) if isinstance(a, dict)}
    first_caption = _first_captions(captions)
    images = list(panoptic.get("images", []))  # entries that are not objects too: each is a reject, never dropped
    images.sort(key=lambda im: im["id"] if isinstance(im, dict) and isinstance(im.get("id"), int) else -1)
    seen: set[int] = set()
    for position, image in enumerate(images):
        unit = f"{layout.panoptic_json}#{position // unit_images:06d}"
        image_id, file_name = (image.get("id"), image.get("file_name")) if isinstance(image, dict) else (None, None)
        if not isinstance(image_id, int) or not isinstance(file_name, str):
            yield Reject(f"{layout.panoptic_json}:images[{position}]", unit, "read", "malformed_coco_image")
            continue
        key = coco_key(layout.split, image_id)
        if image_id in seen:
            yield Reject(key, unit, "read", "duplicate_key")
            continue
        seen.add(image_id)
        annotation = annotations.get(image_id)
        unusable = unencodable_text(key, unit, caption=first_caption.get(image_id), file_name=file_name,
                                    png=annotation.get("file_name") if annotation else None)
        if unusable:  # before the entry crosses a Beam coder
            yield unusable
            continue
        problem = _annotation_problem(annotation, categories) if annotation else None
        if problem:  # the image still flows: only a segmenter that reads the ground truth rejects it (decode)
            yield {"key": key, "unit": unit, "file_name": file_name, "caption": first_caption.get(image_id),
                   "png": None, "segments_info": None, "annotation_error": problem}
            continue
        segments_info = _segments_info(annotation, categories) if annotation else None
        label = unencodable_label({"segments_info": segments_info})
        if label is not None:  # a category name the shards could not hold
            yield unencodable_text(key, unit, label=label)
            continue
        yield {
            "key": key, "unit": unit, "file_name": file_name, "caption": first_caption.get(image_id),
            "png": annotation.get("file_name") if annotation else None, "segments_info": segments_info,
        }


def _safe_name(name: str | None) -> bool:
    """A relative file name that stays inside its folder."""
    return bool(name) and not name.startswith("/") and ".." not in name.replace("\\", "/").split("/")


def load_coco_entry(entry: dict, layout: CocoLayout) -> RawSample | Reject:
    """Read one indexed image and its PNG id map."""
    key, unit = entry["key"], entry["unit"]
    names = [entry["file_name"]] + ([entry["png"]] if entry["png"] else [])
    if not all(_safe_name(n) for n in names):
        return Reject(key, unit, "read", f"bad_file_name: {names}")
    try:
        image = read_optional(FileSystems.join(layout.image_dir, entry["file_name"]), layout.image_dir)
        png = (read_optional(FileSystems.join(layout.png_dir, entry["png"]), layout.png_dir) if entry["png"]
               else None)
    except FileRefused as exc:
        return Reject(key, unit, "read", str(exc))
    except OSError as exc:
        return Reject(key, unit, "read", f"unreadable_file: {exc}")
    if image is None:  # named by the json but absent: which file, not decode's bare missing_image
        return Reject(key, unit, "read", f"missing_image: {entry['file_name']!r} does not exist in "
                      f"{layout.image_dir!r}")
    if entry["png"] and png is None:  # listed by the panoptic json but absent (an image it lists no entry for is
        # decode's missing_annotation)
        return Reject(key, unit, "read", f"missing_annotation: {entry['png']!r} does not exist in {layout.png_dir!r}")
    annotation = None if entry["segments_info"] is None else {"segments_info": entry["segments_info"]}
    if entry.get("annotation_error"):
        annotation = {"segments_info": None, "error": entry["annotation_error"]}
    return RawSample(key, unit, image, entry["caption"], png, annotation)


def _parse_coco_json(data: bytes, path: str) -> dict:
    """JSON bytes -> the object they hold; ValueError naming `path` when they are not a JSON object."""
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, deep nesting: none names it
        raise ValueError(f"COCO json {path!r} is not valid JSON: {type(exc).__name__}: {exc}") from exc
    if not isinstance(parsed, dict):
        raise ValueError(f"COCO json {path!r} holds a JSON {type(parsed).__name__}, expected an object")
    return parsed


def _load_json(path: str) -> dict:
    """A JSON object from any Beam filesystem."""
    with FileSystems.open(path) as handle:
        return _parse_coco_json(handle.read(), path)


class _IndexCoco(beam.DoFn):
    """panoptic json -> entries (main), Rejects and per-unit counts (tagged); units in `skip` are left out."""

    def __init__(self, layout: CocoLayout, skip: frozenset[str], unit_images: int) -> None:
        self.layout, self.skip, self.unit_images = layout, skip, unit_images

    def process(self, panoptic_path: str) -> Iterator:
        panoptic, captions = _load_json(panoptic_path), _load_json(self.layout.captions_json)
        counts: dict[str, int] = {}
        for item in coco_index(panoptic, captions, self.layout, self.unit_images):
            unit = item.source if isinstance(item, Reject) else item["unit"]
            if unit in self.skip:
                continue
            counts[unit] = counts.get(unit, 0) + 1
            yield beam.pvalue.TaggedOutput(REJECTS, item) if isinstance(item, Reject) else item
        logger.info("COCO %s: %d item(s) in %d unit(s) to read", self.layout.split, sum(counts.values()), len(counts))
        for unit, count in counts.items():
            yield beam.pvalue.TaggedOutput(COUNTS, (unit, count))


class _LoadCocoEntry(beam.DoFn):
    """COCO entry -> RawSample (main) or Reject (tagged)."""

    def __init__(self, layout: CocoLayout) -> None:
        self.layout = layout
        self.read = beam.metrics.Metrics.counter("spatext_read", "samples_read")
        self.rejected = beam.metrics.Metrics.counter("spatext_read", "rejected")

    def process(self, entry: dict) -> Iterator:
        yield from route_item(load_coco_entry(entry, self.layout), self.read, self.rejected)


class ReadCoco(beam.PTransform):
    """A COCO panoptic split -> {"samples", "rejects", "counts"}; units in `skip` are not read."""

    def __init__(
        self, layout: CocoLayout, skip: frozenset[str] = frozenset(), unit_images: int = COCO_UNIT_IMAGES
    ) -> None:
        super().__init__()
        if unit_images < 1:
            raise ValueError(f"unit_images must be >= 1, got {unit_images}")
        self.layout, self.skip, self.unit_images = layout, skip, unit_images

    def expand(self, pbegin) -> dict:
        indexed = (
            pbegin
            | "ListCocoSplit" >> beam.Create([self.layout.panoptic_json])
            | "IndexCoco" >> beam.ParDo(_IndexCoco(self.layout, self.skip, self.unit_images)).with_outputs(
                REJECTS, COUNTS, main="entries")
        )
        loaded = (
            indexed.entries
            | "SpreadCocoImages" >> beam.Reshuffle()
            | "LoadCocoImages" >> beam.ParDo(_LoadCocoEntry(self.layout)).with_outputs(REJECTS, main="samples")
        )
        rejects = (indexed[REJECTS], loaded[REJECTS]) | "MergeCocoRejects" >> beam.Flatten()
        return {"samples": loaded.samples, REJECTS: rejects, COUNTS: indexed[COUNTS]}
