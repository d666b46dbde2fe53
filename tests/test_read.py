"""Readers: webdataset tars and folders -> RawSamples, bad inputs -> Rejects, format detection."""

from __future__ import annotations

import json
import os

import pytest

from conftest import jpeg_bytes
from spatext.pipeline import read
from spatext.pipeline.records import RawSample, Reject


def _iter_tar(path):
    with open(path, "rb") as handle:
        return list(read.iter_webdataset(handle, path))


def test_webdataset_groups_members_by_key(make_tar):
    ann = json.dumps({"segments_info": [{"id": 1, "category": "sky"}]}).encode()
    path = make_tar("a.tar", [
        ("x/k1.jpg", b"img1"), ("x/k1.txt", b"cap one"), ("x/k1.json", ann), ("x/k1.panoptic.png", b"png"),
        ("k2.png", b"img2"), ("k2.json", json.dumps({"caption": "from json", "url": "u"}).encode()),
        ("k3.txt", b"no image"),
    ])
    items = _iter_tar(path)
    assert [i.key for i in items] == ["x/k1", "k2", "k3"]
    k1, k2, k3 = items
    assert (k1.image_bytes, k1.caption, k1.annotation_png) == (b"img1", "cap one", b"png")
    assert k1.annotation["segments_info"][0]["category"] == "sky"
    assert k2.caption == "from json" and k2.annotation is None  # metadata json without segments_info
    assert k3.image_bytes is None  # decode turns this into missing_image
    assert all(i.source == path for i in items)


def test_duplicate_and_oversized_members_become_rejects(make_tar, monkeypatch):
    monkeypatch.setattr(read, "MAX_MEMBER_BYTES", 10)
    path = make_tar("b.tar", [("k1.jpg", b"x"), ("k2.jpg", b"y" * 11), ("k1.txt", b"again")])
    items = _iter_tar(path)
    assert [(type(i).__name__, i.key) for i in items] == [("RawSample", "k1"), ("Reject", "k2"), ("Reject", "k1")]
    assert items[1].reason.startswith("member_too_large") and items[2].reason == "duplicate_key"


def test_truncated_tar_keeps_what_was_read_and_rejects_the_rest(make_tar):
    path = make_tar("c.tar", [("k1.jpg", b"a" * 2000), ("k1.txt", b"c"), ("k2.jpg", b"b" * 5000), ("k2.txt", b"d")])
    with open(path, "r+b") as handle:
        handle.truncate(5000)  # inside k2.jpg's data
    items = _iter_tar(path)
    assert isinstance(items[0], RawSample) and (items[0].key, items[0].caption) == ("k1", "c")
    assert isinstance(items[-1], Reject) and items[-1].reason.startswith("unreadable_tar")


def test_not_a_tar_is_one_reject(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(b"\x00garbage" * 100)
    items = _iter_tar(str(path))
    assert len(items) == 1 and items[0].stage == "read" and items[0].reason.startswith("unreadable_tar")


def test_caption_lines_parse_dedupe_and_reject(tmp_path):
    lines = [
        json.dumps({"key": "a", "image": "images/a.jpg", "caption": "A"}),
        "{not json",
        json.dumps({"image": "images/b.jpg", "caption": "B"}),
        json.dumps({"key": "a", "image": "images/a2.jpg", "caption": "A again"}),
        "",
    ]
    items = list(read.iter_caption_lines(lines, "captions.jsonl", unit_lines=2))
    assert items[0] == {"key": "a", "image": "images/a.jpg", "caption": "A", "unit": "captions.jsonl#000000"}
    assert items[2]["unit"] == "captions.jsonl#000001" and items[3].source == "captions.jsonl#000001"
    assert isinstance(items[1], Reject) and items[1].reason == "malformed_caption_line"
    assert items[2]["key"] == "images/b"
    assert isinstance(items[3], Reject) and items[3].reason == "duplicate_key"
    assert len(items) == 4


def test_folder_entry_reads_image_and_ground_truth(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "panoptic").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "panoptic" / "a.png").write_bytes(b"png")
    (tmp_path / "panoptic" / "a.json").write_text(json.dumps({"segments_info": []}))
    raw = read.load_folder_entry({"key": "a", "image": "images/a.jpg", "caption": "c"}, str(tmp_path))
    assert raw.image_bytes == jpeg_bytes() and raw.annotation_png == b"png" and raw.annotation == {"segments_info": []}
    missing = read.load_folder_entry({"key": "b", "image": "images/b.jpg", "caption": "c"}, str(tmp_path))
    assert missing.image_bytes is None and missing.annotation_png is None


def test_detect_format_and_brace_ranges(tmp_path, make_tar):
    for i in range(3):
        make_tar(f"shard-{i:03d}.tar", [("k.txt", b"c")])
    assert read.expand_braces("s-{008..010}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar"]
    assert len(read.match_files(str(tmp_path / "shard-{000..001}.tar"))) == 2
    assert read.detect_format(str(tmp_path / "*.tar")) == "webdataset"
    (tmp_path / "captions.jsonl").write_text("")
    assert read.detect_format(str(tmp_path)) == "folder"
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match="cannot detect the format"):
        read.detect_format(str(tmp_path / "*"))
    with pytest.raises(ValueError, match="matches no file"):
        read.detect_format(os.path.join(str(tmp_path), "nothing-*.tar"))
