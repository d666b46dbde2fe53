"""Tests of the procedural demo corpus: determinism, exact ground truth, formats, captions and the CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from spatext.pipeline.demo_corpus import (
    CATEGORIES,
    STUFF_CATEGORIES,
    THING_CATEGORIES,
    build_parser,
    generate_sample,
    main,
    write_corpus,
)
from spatext.pipeline.demo_corpus_draw import PALETTE, TEXTURE_WORD
from spatext.pipeline.panoptic import decode_id_map

NUM_IN_MEMORY = 50
PATTERN_WORDS = {w for w in TEXTURE_WORD.values() if w}
MEMBER_SUFFIXES = ("jpg", "txt", "json", "panoptic.png")


@pytest.fixture(scope="module")
def samples():
    """Fifty in-memory samples of seed 0."""
    return [generate_sample(i, 0) for i in range(NUM_IN_MEMORY)]


@pytest.fixture(scope="module")
def wds_dir(tmp_path_factory):
    """Ten samples as webdataset shards of four (three shards)."""
    out = str(tmp_path_factory.mktemp("wds"))
    write_corpus(out, 10, seed=0, fmt="webdataset", samples_per_shard=4)
    return out


@pytest.fixture(scope="module")
def folder_dir(tmp_path_factory):
    """Six samples as a folder."""
    out = str(tmp_path_factory.mktemp("folder"))
    write_corpus(out, 6, seed=0, fmt="folder")
    return out


def _read_tree(root: str) -> dict[str, bytes]:
    """Every file under root, by relative path."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def _shard_members(path: str) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def _check_ground_truth(id_map: np.ndarray, segments: list[dict]) -> None:
    """ids in the map == ids in segments_info; area and bbox exact; areas + void = H * W."""
    ids, counts = np.unique(id_map, return_counts=True)
    present = {int(i): int(c) for i, c in zip(ids, counts, strict=True) if i != 0}
    assert {s["id"] for s in segments} == set(present)
    assert len({s["id"] for s in segments}) == len(segments)
    for s in segments:
        assert s["id"] > 0 and s["area"] == present[s["id"]]
        ys, xs = np.where(id_map == s["id"])
        assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert s["category"] in CATEGORIES
        assert s["isthing"] == (s["category"] in THING_CATEGORIES)
        assert isinstance(s["description"], str) and s["description"]
    void = int((id_map == 0).sum())
    assert sum(s["area"] for s in segments) == id_map.size - void


# ---------------------------------------------------------------- determinism


def test_generate_sample_is_a_pure_function_of_index_and_seed():
    a, b = generate_sample(3, 0), generate_sample(3, 0)
    assert a.key == "demo-000003"
    assert np.array_equal(a.image, b.image) and np.array_equal(a.id_map, b.id_map)
    assert (a.caption, a.segments) == (b.caption, b.segments)
    other = generate_sample(3, 1)
    assert other.image.shape != a.image.shape or not np.array_equal(other.image, a.image)
    assert generate_sample(4, 0).caption != a.caption


@pytest.mark.parametrize("fmt", ["webdataset", "folder"])
def test_written_bytes_are_identical_for_the_same_seed(tmp_path, fmt):
    write_corpus(str(tmp_path / "a"), 5, seed=7, fmt=fmt, samples_per_shard=2)
    write_corpus(str(tmp_path / "b"), 5, seed=7, fmt=fmt, samples_per_shard=2)
    write_corpus(str(tmp_path / "c"), 5, seed=8, fmt=fmt, samples_per_shard=2)
    a, b, c = (_read_tree(str(tmp_path / d)) for d in "abc")
    assert a == b
    assert set(a) == set(c)
    data = [name for name in a if name != "corpus.json"]
    assert data and all(a[name] != c[name] for name in data if not name.endswith(".txt"))


# ---------------------------------------------------------------- in-memory samples


def test_samples_have_exact_ground_truth_and_no_void(samples):
    for s in samples:
        assert s.id_map.dtype == np.int32 and s.image.dtype == np.uint8
        assert s.image.shape == s.id_map.shape + (3,)
        _check_ground_truth(s.id_map, s.segments)
        assert not (s.id_map == 0).any()


def test_sizes_objects_and_stuff_are_in_range_and_varied(samples):
    shapes = [s.image.shape[:2] for s in samples]
    assert all(256 <= h <= 640 and 256 <= w <= 640 for h, w in shapes)
    assert any(h > 1.3 * w for h, w in shapes) and any(w > 1.3 * h for h, w in shapes)
    things = [[seg for seg in s.segments if seg["isthing"]] for s in samples]
    assert all(1 <= len(t) <= 6 for t in things)
    assert {len(t) for t in things} >= {1, 2, 3, 4, 5}
    assert all(1 <= sum(not seg["isthing"] for seg in s.segments) <= 2 for s in samples)
    categories = {seg["category"] for s in samples for seg in s.segments}
    assert len(categories & set(THING_CATEGORIES)) >= 12 and len(categories & set(STUFF_CATEGORIES)) >= 6
    fractions = [s.shape_areas[seg["id"]] / s.id_map.size for s, t in zip(samples, things, strict=True) for seg in t]
    assert min(fractions) < 0.004 and max(fractions) > 0.25
    words = " ".join(seg["description"] for t in things for seg in t).split()
    assert {"tiny", "small", "medium-sized", "large", "huge"} <= set(words)
    assert PATTERN_WORDS <= set(words)


def test_captions_mention_every_visible_object_and_the_background(samples):
    for s in samples:
        assert s.caption.strip()
        for seg in s.segments:
            assert seg["description"] in s.caption, (s.key, seg, s.caption)
    assert len({s.caption for s in samples}) == len(samples)


def test_solid_objects_are_painted_exactly_on_their_mask(samples):
    """In memory the image is exact: a solid object's visible pixels all have its palette colour, and few pixels
    right outside them (other segments) do, so its edge in the image is the mask's edge."""
    checked, outside_same = 0, []
    for s in samples:
        for seg in s.segments:
            words = seg["description"].split()
            if not seg["isthing"] or PATTERN_WORDS & set(words):
                continue
            colour = np.asarray(PALETTE[words[-2]], dtype=np.uint8)
            mask = s.id_map == seg["id"]
            assert (s.image[mask] == colour).all(), (s.key, seg)
            ring = np.zeros_like(mask)  # 4-neighbour dilation minus the mask
            ring[1:] |= mask[:-1]
            ring[:-1] |= mask[1:]
            ring[:, 1:] |= mask[:, :-1]
            ring[:, :-1] |= mask[:, 1:]
            ring &= ~mask
            outside_same.append((s.image[ring] == colour).all(axis=1).mean())
            checked += 1
    assert checked >= 30
    assert np.mean(outside_same) < 0.02


def test_patterned_objects_differ_from_the_background_behind_them(samples):
    """Objects are coloured against the background: mean colours of object and the surrounding stuff differ."""
    distances = []
    for s in samples:
        stuff = [seg for seg in s.segments if not seg["isthing"]]
        for seg in (seg for seg in s.segments if seg["isthing"]):
            obj = s.image[s.id_map == seg["id"]].astype(float).mean(axis=0)
            x, y, w, h = seg["bbox"]
            window = s.id_map[y:y + h, x:x + w]
            behind = np.isin(window, [st["id"] for st in stuff])
            if behind.sum() < 20:
                continue
            distances.append(np.linalg.norm(obj - s.image[y:y + h, x:x + w][behind].astype(float).mean(axis=0)))
    assert len(distances) > 50 and np.median(distances) > 60


def test_occlusion_happens_and_visible_area_never_exceeds_the_shape(samples):
    occluded = 0
    for s in samples:
        for seg in s.segments:
            if seg["isthing"]:
                assert seg["area"] <= s.shape_areas[seg["id"]]
                occluded += seg["area"] < 0.9 * s.shape_areas[seg["id"]]
    assert occluded >= 5


# ---------------------------------------------------------------- formats


def test_webdataset_shards_members_and_manifest(wds_dir):
    names = sorted(os.listdir(wds_dir))
    assert names == ["corpus.json", "shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    keys = []
    for shard, count in zip(names[1:], (4, 4, 2), strict=True):
        members = _shard_members(os.path.join(wds_dir, shard))
        assert len(members) == 4 * count
        for i in range(0, len(members), 4):
            key = members[i][0].name[: -len(".jpg")]
            keys.append(key)
            assert [m.name for m, _ in members[i:i + 4]] == [f"{key}.{x}" for x in MEMBER_SUFFIXES]
        assert all(m.mtime == 0 and m.mode == 0o644 and m.uid == 0 and m.gid == 0 for m, _ in members)
    assert keys == [f"demo-{i:06d}" for i in range(10)]
    with open(os.path.join(wds_dir, "corpus.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest == {"generator": "spatext demo-corpus", "seed": 0, "num_samples": 10, "format": "webdataset",
                        "categories": sorted(CATEGORIES), "files": names[1:]}


def test_webdataset_ground_truth_matches_stored_image_and_caption(wds_dir):
    for shard in ("shard-00000.tar", "shard-00002.tar"):
        members = _shard_members(os.path.join(wds_dir, shard))
        for i in range(0, len(members), 4):
            (jpg_info, jpg), (_, txt), (_, gt_bytes), (_, png) = members[i:i + 4]
            gt = json.loads(gt_bytes)
            key = jpg_info.name[: -len(".jpg")]
            assert set(gt) == {"key", "caption", "width", "height", "segments_info"} and gt["key"] == key
            assert gt["caption"] == txt.decode("utf-8")
            id_map = decode_id_map(png)
            image = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
            assert image.shape[:2] == id_map.shape == (gt["height"], gt["width"])
            _check_ground_truth(id_map, gt["segments_info"])
            assert gt == json.loads(json.dumps(_in_memory_ground_truth(int(key[5:]))))


def _in_memory_ground_truth(index: int) -> dict:
    s = generate_sample(index, 0)
    h, w = s.id_map.shape
    return {"key": s.key, "caption": s.caption, "width": w, "height": h, "segments_info": s.segments}


def test_stored_jpeg_keeps_solid_colours_inside_the_mask(wds_dir):
    """After JPEG, a solid object's mean colour inside its (decoded PNG) mask is still its palette colour."""
    checked = 0
    for shard in sorted(n for n in os.listdir(wds_dir) if n.endswith(".tar")):
        members = _shard_members(os.path.join(wds_dir, shard))
        for i in range(0, len(members), 4):
            image = np.asarray(Image.open(io.BytesIO(members[i][1])).convert("RGB")).astype(float)
            id_map = decode_id_map(members[i + 3][1])
            for seg in json.loads(members[i + 2][1])["segments_info"]:
                words = seg["description"].split()
                if seg["isthing"] and not PATTERN_WORDS & set(words) and seg["area"] >= 400:
                    mean = image[id_map == seg["id"]].mean(axis=0)
                    assert np.linalg.norm(mean - PALETTE[words[-2]]) < 12, (seg, mean)
                    checked += 1
    assert checked >= 5


def test_folder_layout_and_ground_truth(folder_dir):
    files = set(_read_tree(folder_dir))
    keys = [f"demo-{i:06d}" for i in range(6)]
    expected = {"corpus.json", "captions.jsonl"}
    expected |= {f"images/{k}.jpg" for k in keys} | {f"panoptic/{k}.png" for k in keys}
    expected |= {f"panoptic/{k}.json" for k in keys}
    assert files == expected
    with open(os.path.join(folder_dir, "captions.jsonl"), encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    assert [entry["key"] for entry in lines] == keys
    for entry in lines:
        assert set(entry) == {"key", "image", "caption"} and entry["image"] == f"images/{entry['key']}.jpg"
        with open(os.path.join(folder_dir, "panoptic", f"{entry['key']}.json"), encoding="utf-8") as f:
            gt = json.load(f)
        assert gt["caption"] == entry["caption"] and gt["key"] == entry["key"]
        with open(os.path.join(folder_dir, "panoptic", f"{entry['key']}.png"), "rb") as f:
            id_map = decode_id_map(f.read())
        with Image.open(os.path.join(folder_dir, entry["image"])) as im:
            assert im.size == (gt["width"], gt["height"]) == (id_map.shape[1], id_map.shape[0])
        _check_ground_truth(id_map, gt["segments_info"])
    with open(os.path.join(folder_dir, "corpus.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["format"] == "folder" and set(manifest["files"]) == expected - {"corpus.json"}


def test_rewriting_a_smaller_corpus_removes_its_stale_shards(tmp_path):
    out = str(tmp_path)
    assert write_corpus(out, 5, seed=0, samples_per_shard=2)["files"] == [f"shard-0000{i}.tar" for i in range(3)]
    summary = write_corpus(out, 2, seed=0, samples_per_shard=2)
    assert summary["num_shards"] == 1 and summary["num_samples"] == 2
    assert sorted(os.listdir(out)) == ["corpus.json", "shard-00000.tar"]


# ---------------------------------------------------------------- errors and CLI


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fmt": "parquet"}, r"fmt must be one of \['webdataset', 'folder'\]"),
        ({"num_samples": 0}, "num_samples"),
        ({"samples_per_shard": 0}, "samples_per_shard"),
        ({"seed": -1}, "seed"),
        ({"min_side": 641}, "min_side must be between 0 and 640"),
    ],
)
def test_bad_arguments_raise(tmp_path, kwargs, match):
    args = {"out_dir": str(tmp_path), "num_samples": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        write_corpus(**args)
    assert not os.listdir(tmp_path)


def test_min_side_keeps_the_first_samples_that_large(tmp_path):
    """min_side: the first samples by index whose longest side reaches it, checked against generate_sample."""
    summary = write_corpus(str(tmp_path), 6, seed=1, fmt="folder", min_side=560)
    expected = [s for s in (generate_sample(i, 1) for i in range(200)) if max(s.image.shape[:2]) >= 560][:6]
    keys = [json.loads(line)["key"] for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert keys == [s.key for s in expected] and summary["num_samples"] == 6
    for key in keys:
        with Image.open(tmp_path / "images" / f"{key}.jpg") as im:
            assert max(im.size) >= 560
    assert json.loads((tmp_path / "corpus.json").read_text())["min_side"] == 560


def test_cli_main_writes_a_folder_corpus(tmp_path, capsys):
    out = str(tmp_path / "corpus")
    assert main([out, "--num-samples", "2", "--seed", "3", "--format", "folder"]) == 0
    assert "2 samples" in capsys.readouterr().out
    with open(os.path.join(out, "corpus.json"), encoding="utf-8") as f:
        assert json.load(f)["seed"] == 3
    defaults = build_parser().parse_args(["x"])
    assert (defaults.num_samples, defaults.seed, defaults.format, defaults.samples_per_shard) == (
        64, 0, "webdataset", 16)
    with pytest.raises(SystemExit):
        main([out, "--format", "zip"])
    with pytest.raises(SystemExit):
        main([out, "--num-samples", "0"])


def test_module_runs_as_a_script(tmp_path):
    out = str(tmp_path / "corpus")
    cmd = [sys.executable, "-m", "spatext.pipeline.demo_corpus", out, "--num-samples", "2", "--samples-per-shard", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["corpus.json", "shard-00000.tar", "shard-00001.tar"]


def test_demo_summary_names_a_rejects_folder_only_when_there_is_one():
    from spatext.demo import rejects_line

    assert rejects_line("b", {"rejected": 2}) == f"  rejects  {os.path.join('b', 'rejects')}"
    assert "no rejects/ folder" in rejects_line("b", {"rejected": 0})
