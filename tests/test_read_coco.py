"""COCO panoptic corpora: layout and split detection, the index (captions, category names, units), the real build."""

from __future__ import annotations

import json
import shutil

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import assert_that, equal_to

from conftest import read_rows
from spatext.pipeline import build, read, read_coco, verify
from spatext.pipeline.decode import DecodeError, DecodeOptions, decode_sample
from spatext.pipeline.demo_corpus import CATEGORIES, STUFF_CATEGORIES, encode_jpeg, generate_sample
from spatext.pipeline.panoptic import encode_id_map
from spatext.pipeline.read import COUNTS, ReadCorpus, ReadOptions
from spatext.pipeline.read_coco import CocoLayout, coco_index, coco_key, find_coco, load_coco_entry
from spatext.pipeline.records import Reject
from spatext.pipeline.schema import row_to_sample

SEED = 4
IMAGE_IDS = (139, 285, 632, 724, 776, 785)  # 776 has no caption, 785 no panoptic annotation
CATEGORY_IDS = {name: 10 + i for i, name in enumerate(CATEGORIES)}  # demo categories -> COCO-style integer ids


def _write(path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def write_coco(root, split: str = "val2017") -> dict:
    """A COCO-format copy of a small demo corpus: images, id PNGs, panoptic json, captions json (2 per image)."""
    images, annotations, captions, samples = [], [], [], {}
    for index, image_id in enumerate(IMAGE_IDS):
        s = samples[image_id] = generate_sample(index, SEED)
        name = f"{image_id:012d}"
        _write(root / split / f"{name}.jpg", encode_jpeg(s.image))
        images.append({"id": image_id, "file_name": f"{name}.jpg", "width": s.image.shape[1],
                       "height": s.image.shape[0]})
        if image_id != 785:
            _write(root / "annotations" / f"panoptic_{split}" / f"{name}.png", encode_id_map(s.id_map))
            annotations.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": [
                {"id": g["id"], "category_id": CATEGORY_IDS[g["category"]], "iscrowd": 0, "area": g["area"],
                 "bbox": g["bbox"]} for g in s.segments]})
        if image_id != 776:  # the demo caption has the smaller id but comes second in the list
            captions += [{"id": 5000 - index, "image_id": image_id, "caption": "a later caption"},
                         {"id": 100 + index, "image_id": image_id, "caption": s.caption}]
    categories = [{"id": i, "name": n, "isthing": int(n not in STUFF_CATEGORIES), "supercategory": "demo"}
                  for n, i in CATEGORY_IDS.items()]
    images.reverse()  # the index sorts by image id
    _write(root / "annotations" / f"panoptic_{split}.json",
           json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    _write(root / "annotations" / f"captions_{split}.json", json.dumps({"images": images, "annotations": captions}))
    return samples


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return root, write_coco(root)


def test_find_coco_layout_and_split(coco, tmp_path):
    root, _ = coco
    layout = find_coco(str(root))
    assert layout == CocoLayout(str(root), "val2017") and layout.image_dir == str(root / "val2017")
    assert find_coco(str(root / "annotations" / "panoptic_val2017.json")) == layout
    assert read.detect_format(str(root)) == "coco"
    with pytest.raises(ValueError, match=r"--coco-split 'train2017'.*available: val2017"):
        find_coco(str(root), "train2017")
    two = tmp_path / "two"
    for split in ("val2017", "train2017"):
        _write(two / "annotations" / f"panoptic_{split}.json", "{}")
    with pytest.raises(ValueError, match=r"several COCO splits \(train2017, val2017\); pass --coco-split"):
        find_coco(str(two))
    with pytest.raises(ValueError, match=r"needs captions: .*captions_val2017\.json"):
        find_coco(str(two), "val2017")
    with pytest.raises(ValueError, match=r"no .*panoptic_\*\.json"):
        find_coco(str(tmp_path / "nothing"))


def test_index_names_categories_picks_the_first_caption_and_chunks_units(coco):
    root, samples = coco
    layout = find_coco(str(root))
    panoptic = json.loads((root / "annotations" / "panoptic_val2017.json").read_text())
    captions = json.loads((root / "annotations" / "captions_val2017.json").read_text())
    panoptic["images"].append(dict(panoptic["images"][0]))  # a duplicate image id
    panoptic["images"].append({"file_name": "no-id.jpg"})
    panoptic["images"].append("not an object")  # a reject too, never dropped uncounted
    items = list(coco_index(panoptic, captions, layout, unit_images=4))
    entries = [i for i in items if isinstance(i, dict)]
    assert [e["key"] for e in entries] == [f"coco-val2017-{i:012d}" for i in IMAGE_IDS]
    # units of 4 positions; the two entries without an id sort first (positions 0 and 1), the duplicate next to its id
    assert [e["unit"][-6:] for e in entries] == ["000000", "000000", "000001", "000001", "000001", "000001"]
    assert entries[0]["unit"] == f"{layout.panoptic_json}#000000"
    assert entries[0]["caption"] == samples[139].caption and entries[4]["caption"] is None
    first = entries[0]["segments_info"]
    assert [(s["id"], s["category"]) for s in first] == [(g["id"], g["category"]) for g in samples[139].segments]
    assert entries[5]["png"] is None and entries[5]["segments_info"] is None
    rejects = sorted(i.reason for i in items if isinstance(i, Reject))
    assert rejects == ["duplicate_key", "malformed_coco_image", "malformed_coco_image"]
    unsafe = load_coco_entry({**entries[0], "file_name": "../../etc/passwd"}, layout)
    assert isinstance(unsafe, Reject) and unsafe.reason.startswith("bad_file_name")


def test_units_and_their_counts_through_beam(coco):
    root, _ = coco
    with beam.Pipeline(runner="DirectRunner") as p:
        read_out = p | ReadCorpus(str(root), ReadOptions(coco_unit_images=4))
        source = str(root / "annotations" / "panoptic_val2017.json")
        assert_that(read_out[COUNTS], equal_to([(f"{source}#000000", 4), (f"{source}#000001", 2)]), label="Counts")
        keys = read_out["samples"] | beam.Map(lambda s: (s.key, s.annotation_png is not None))
        assert_that(keys, equal_to([(f"coco-val2017-{i:012d}", i != 785) for i in IMAGE_IDS]), label="Keys")


@pytest.fixture(scope="module")
def built(coco, tmp_path_factory):
    root, _ = coco
    out = tmp_path_factory.mktemp("coco_build")
    return out, build.run(["--input", str(root), "--output", str(out), "--clip-model", "spatext-tiny",
                           "--clip-pretrained", "none", "--image-format", "png", "--image-size", "640"])


def test_build_uses_coco_ground_truth(built, coco):
    """Labels are the category names; masks are the ground truth's pixels exactly; the caption is the first by id."""
    out, manifest = built
    _, samples = coco
    counts = manifest["counts"]
    assert (counts["read"], counts["accepted"], counts["units"]) == (6, 4, 1)
    assert counts["rejected_by_reason"] == {"decode/missing_annotation": 1, "decode/missing_caption": 1}
    assert manifest["lineage"]["segmenter"] == "annotations"
    rows = read_rows(out)
    assert [r["key"] for r in rows] == [f"coco-val2017-{i:012d}" for i in IMAGE_IDS[:4]]
    for row in rows:
        sample, truth = row_to_sample(row), samples[int(row["key"].rsplit("-", 1)[1])]
        assert sample.caption == truth.caption and sample.image.shape == truth.image.shape
        categories = {g["id"]: g["category"] for g in truth.segments}
        for seg in sample.segments:
            mask = sample.segment_map == seg["index"]
            (gt_id,) = np.unique(truth.id_map[mask])
            np.testing.assert_array_equal(mask, truth.id_map == gt_id)
            assert seg["label"] == categories[gt_id]
    report = verify.verify_build(str(out), progress=False)
    assert report.ok, report.format()


def _broken_copy(coco, tmp_path, name):
    """A copy of the module's COCO root, to break one piece of."""
    root, _ = coco
    copy = tmp_path / name
    shutil.copytree(root, copy)
    return copy


@pytest.mark.parametrize(("breakage", "message"), [
    ("no_images", r"needs its images: no file in .*val2017'"),
    ("no_pngs", r"needs its panoptic PNG id maps: no file in .*annotations/panoptic_val2017'"),
    ("truncated_panoptic", r"COCO json .*panoptic_val2017\.json' is not valid JSON"),
    ("list_captions", r"COCO json .*captions_val2017\.json' holds a JSON list, expected an object"),
    ("no_categories", r"COCO json .*panoptic_val2017\.json': 'categories' missing or not a list"),
])
def test_find_coco_fails_at_launch_on_a_missing_or_broken_piece(coco, tmp_path, breakage, message):
    """Each of these used to launch the job: it then rejected every image (no folder) or failed mid-job with a
    traceback (bad json)."""
    root = _broken_copy(coco, tmp_path, breakage)
    panoptic = root / "annotations" / "panoptic_val2017.json"
    if breakage == "no_images":
        shutil.rmtree(root / "val2017")
    elif breakage == "no_pngs":
        shutil.rmtree(root / "annotations" / "panoptic_val2017")
    elif breakage == "truncated_panoptic":
        panoptic.write_bytes(panoptic.read_bytes()[:100])
    elif breakage == "list_captions":
        (root / "annotations" / "captions_val2017.json").write_text("[1, 2]")
    else:
        panoptic.write_text(json.dumps({k: v for k, v in json.loads(panoptic.read_text()).items()
                                        if k != "categories"}))
    with pytest.raises(ValueError, match=message):
        find_coco(str(root))
    out = tmp_path / f"{breakage}-build"
    with pytest.raises(ValueError, match=message):  # the build fails the same way before --output is touched
        build.run(["--input", str(root), "--output", str(out), "--clip-model", "spatext-tiny", "--clip-pretrained",
                   "none"])
    assert not out.exists()


def test_a_big_coco_json_is_only_sniffed_at_launch(coco, tmp_path, monkeypatch):
    """Over LAUNCH_PARSE_BYTES (train2017-sized) a json is not parsed at launch; a truncated one is still caught."""
    monkeypatch.setattr(read_coco, "LAUNCH_PARSE_BYTES", 100)
    root = _broken_copy(coco, tmp_path, "big")
    assert find_coco(str(root)).split == "val2017"  # whole files pass without a parse
    panoptic = root / "annotations" / "panoptic_val2017.json"
    panoptic.write_bytes(panoptic.read_bytes()[:-50])
    with pytest.raises(ValueError, match=r"panoptic_val2017\.json' \(\d+ bytes\) is not a whole JSON object"):
        find_coco(str(root))


def test_unknown_category_or_malformed_segments_are_rejected(coco):
    """A segment whose category id is not in `categories` used to get label None silently."""
    root, _ = coco
    layout = find_coco(str(root))
    panoptic = json.loads((root / "annotations" / "panoptic_val2017.json").read_text())
    captions = json.loads((root / "annotations" / "captions_val2017.json").read_text())
    first, second, third = sorted(panoptic["annotations"], key=lambda a: a["image_id"])[:3]
    first["segments_info"][0]["category_id"] = 999
    second["segments_info"] = None
    third["file_name"] = 5
    items = {i["key"]: i for i in coco_index(panoptic, captions, layout)}  # the images flow on: decode decides
    problems = {key: i.get("annotation_error") for key, i in items.items() if i.get("annotation_error")}
    assert problems == {
        coco_key("val2017", first["image_id"]):
            "unknown_category: category_id 999 not in the panoptic json's categories",
        coco_key("val2017", second["image_id"]): "malformed_annotation: segments_info is not a list of objects",
        coco_key("val2017", third["image_id"]): "malformed_annotation: file_name is int, not a string",
    }
    labels = [s["category"] for i in items.values() if i["segments_info"] for s in i["segments_info"]]
    assert labels and None not in labels
    bad = load_coco_entry(items[coco_key("val2017", first["image_id"])], layout)
    with pytest.raises(DecodeError, match="bad_annotation: unknown_category: category_id 999"):
        decode_sample(bad, DecodeOptions(require_annotation=True))  # the annotations segmenter needs it: a reject
    assert decode_sample(bad, DecodeOptions(keep_annotation=False)).annotation is None  # a model segmenter: kept


def test_a_category_name_utf8_cannot_encode_rejects_the_images_that_use_it(coco):
    """A lone surrogate escape in a category name would fail the job where labels are written: a read reject."""
    root, _ = coco
    layout = find_coco(str(root))
    panoptic = json.loads((root / "annotations" / "panoptic_val2017.json").read_text())
    captions = json.loads((root / "annotations" / "captions_val2017.json").read_text())
    first = min(panoptic["annotations"], key=lambda a: a["image_id"])
    used = first["segments_info"][0]["category_id"]
    for category in panoptic["categories"]:
        if category["id"] == used:
            category["name"] = "bad \ud800 label"
    items = list(coco_index(panoptic, captions, layout))
    rejected = {i.key: i.reason for i in items if isinstance(i, Reject)}
    users = {coco_key("val2017", a["image_id"]) for a in panoptic["annotations"]
             if any(s["category_id"] == used for s in a["segments_info"])}
    assert set(rejected) == users and coco_key("val2017", first["image_id"]) in users
    assert all(r.startswith("bad_label_encoding: the label 'bad \\ud800 label'") for r in rejected.values())
    assert len(items) == len(panoptic["images"])  # every image is an entry or a reject: none lost


def test_files_the_json_names_that_do_not_exist_are_rejects_naming_them(coco, tmp_path):
    """A listed image or PNG that is gone is a read reject naming the file, told apart from decode's
    missing_annotation for an image the panoptic json has no entry for."""
    root, _ = coco
    copy = tmp_path / "coco"
    shutil.copytree(root, copy)
    (copy / "annotations" / "panoptic_val2017" / "000000000285.png").unlink()
    (copy / "val2017" / "000000000632.jpg").unlink()
    layout = find_coco(str(copy))
    panoptic = json.loads((copy / "annotations" / "panoptic_val2017.json").read_text())
    captions = json.loads((copy / "annotations" / "captions_val2017.json").read_text())
    loaded = {e["key"]: load_coco_entry(e, layout) for e in coco_index(panoptic, captions, layout)}
    png, image = loaded[coco_key("val2017", 285)], loaded[coco_key("val2017", 632)]
    assert (png.stage, png.reason) == (
        "read", f"missing_annotation: '000000000285.png' does not exist in {layout.png_dir!r}")
    assert (image.stage, image.reason) == (
        "read", f"missing_image: '000000000632.jpg' does not exist in {layout.image_dir!r}")
    unlisted = loaded[coco_key("val2017", 785)]  # no panoptic entry: flows on, decode rejects it
    assert not isinstance(unlisted, Reject) and unlisted.annotation_png is None
    assert sum(isinstance(v, Reject) for v in loaded.values()) == 2
