"""Readers: webdataset tars and folders -> RawSamples, bad inputs -> Rejects, format detection."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os

import pytest
import zstandard

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


def test_a_key_repeated_right_after_itself_keeps_the_first_copy(make_tar):
    """k.jpg k.txt k.jpg k.txt: the second copy is a duplicate_key reject, not a silent overwrite of the first."""
    path = make_tar("d.tar", [("k.jpg", b"IMAGE-1"), ("k.txt", b"first"), ("k.jpg", b"IMAGE-2"), ("k.txt", b"second"),
                              ("k.cls", b"1"), ("j.jpg", b"J"), ("j.txt", b"j")])
    items = _iter_tar(path)
    assert [(type(i).__name__, i.key) for i in items] == [("RawSample", "k"), ("Reject", "k"), ("RawSample", "j")]
    assert (items[0].image_bytes, items[0].caption) == (b"IMAGE-1", "first")
    assert items[1].reason == "duplicate_key: k.jpg repeated in this tar"
    assert (items[2].image_bytes, items[2].caption) == (b"J", "j")


def test_truncated_tar_keeps_what_was_read_and_rejects_the_rest(make_tar):
    path = make_tar("c.tar", [("k1.jpg", b"a" * 2000), ("k1.txt", b"c"), ("k2.jpg", b"b" * 5000), ("k2.txt", b"d")])
    with open(path, "r+b") as handle:
        handle.truncate(5000)  # inside k2.jpg's data
    items = _iter_tar(path)
    assert isinstance(items[0], RawSample) and (items[0].key, items[0].caption) == ("k1", "c")
    assert isinstance(items[-1], Reject) and items[-1].reason.startswith("unreadable_tar")


def _member_offsets(path):
    import tarfile

    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]


FOUR_KEYS = [(f"k{i}.{ext}", data) for i in range(4) for ext, data in (("jpg", b"i" * 700), ("txt", b"c"))]


@pytest.mark.parametrize("damage", ["cut_in_header", "garbage_header", "cut_at_member_boundary"])
def test_a_tar_whose_headers_stop_early_ends_with_a_reject(make_tar, damage):
    """tarfile's stream mode ends quietly at a truncated or invalid header after offset 0, as at the end marker:
    the keys behind it vanished with no reject and verify said OK. Now the tar ends with an unreadable_tar reject
    naming the byte where its headers stop."""
    path = make_tar("h.tar", FOUR_KEYS)
    at = _member_offsets(path)[4]  # k2.jpg's header
    data = open(path, "rb").read()
    damaged = {"cut_in_header": data[: at + 200], "garbage_header": data[:at] + b"Z" * 512 + data[at + 512 :],
               "cut_at_member_boundary": data[:at]}[damage]
    open(path, "wb").write(damaged)
    items = _iter_tar(path)
    assert [i.key for i in items if isinstance(i, RawSample)] == ["k0"]  # k1 may miss members behind the damage
    assert len(items) == 2 and isinstance(items[-1], Reject) and items[-1].key == f"{path}#k1"
    assert items[-1].reason.startswith("unreadable_tar") and f"byte {at}" in items[-1].reason


def test_a_tar_whose_end_marker_is_cut_short_keeps_every_member(make_tar):
    """Zero bytes short of a whole block are the start of the end marker (GNU tar reads such a tar): every member
    before them is whole, so nothing is rejected."""
    path = make_tar("e.tar", FOUR_KEYS)
    end = _member_offsets(path)[-1] + 512 + 512  # the last member's header and its 1-byte data block
    data = open(path, "rb").read()
    assert not data[end:].strip(b"\0")
    open(path, "wb").write(data[: end + 300])
    assert [(type(i).__name__, i.key) for i in _iter_tar(path)] == [("RawSample", f"k{i}") for i in range(4)]


def test_a_compressed_tar_cut_inside_its_header_is_one_reject(make_tar, tmp_path):
    import gzip

    path = tmp_path / "cut.tar"
    path.write_bytes(gzip.compress(open(make_tar("g.tar", FOUR_KEYS), "rb").read())[:3])
    items = _iter_tar(str(path))  # CPython's gzip header parser raised TypeError: the whole job failed
    assert len(items) == 1 and items[0].reason.startswith("unreadable_tar: unreadable compressed data after 3 bytes")


COMPRESSORS = {"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress,
               "zstd": lambda data: zstandard.ZstdCompressor().compress(data)}


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_compressed_tars_are_read_and_damage_is_a_reject(make_tar, tmp_path, kind):
    """gzip, bzip2, xz and zstd tars (told by their bytes, whatever the name) read like the plain tar; damaged
    compressed data past the first member ends the tar with a reject, not a failed job."""
    data = COMPRESSORS[kind](open(make_tar("p.tar", FOUR_KEYS), "rb").read())
    path = tmp_path / "c.tar"
    path.write_bytes(data)
    assert [i.key for i in _iter_tar(str(path))] == ["k0", "k1", "k2", "k3"]
    path.write_bytes(data[: len(data) // 2])
    items = _iter_tar(str(path))
    assert isinstance(items[-1], Reject) and items[-1].reason.startswith("unreadable_tar")
    assert len(items) < 5 and all(isinstance(i, RawSample) for i in items[:-1])


def test_compression_is_told_by_whole_magic_numbers_over_short_reads(make_tar, tmp_path):
    """A plain tar whose first member is named BZh... is a plain tar (bzip2 is 'BZh' + level + block magic); the
    magic bytes are gathered over short reads; trailing bytes after a gzip stream end it, as bzip2/xz readers do."""
    import io

    class Trickle(io.RawIOBase):  # at most 3 bytes per read, like a slow socket
        def __init__(self, data):
            self.data = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, buffer):
            chunk = self.data.read(min(3, len(buffer)))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    named = make_tar("bzh.tar", [("BZhello.jpg", b"img"), ("BZhello.txt", b"cap")])
    assert [i.key for i in _iter_tar(named)] == ["BZhello"]
    data = open(make_tar("p.tar", FOUR_KEYS), "rb").read()
    for kind in ("xz", "zstd", "gzip"):
        items = list(read.iter_webdataset(Trickle(COMPRESSORS[kind](data)), "t.tar"))
        assert [i.key for i in items] == ["k0", "k1", "k2", "k3"], kind
    path = tmp_path / "trailing.tar"
    path.write_bytes(gzip.compress(data) + b"garbage!" * 10)
    assert [(type(i).__name__, i.key) for i in _iter_tar(str(path))] == [("RawSample", f"k{i}") for i in range(4)]
    odd = open(make_tar("odd.tar", [("a.jpg", b"i" * 7680), ("a.txt", b"c")]), "rb").read()
    assert len(odd) % 8192  # the last bytes decompressed come with the error on the trailing bytes: kept (read1)
    path.write_bytes(gzip.compress(odd) + b"garbage")
    assert [(type(i).__name__, i.key) for i in _iter_tar(str(path))] == [("RawSample", "a")]
    path.write_bytes(gzip.compress(data[:4096]) + gzip.compress(data[4096:]))  # two members: one stream
    assert [i.key for i in _iter_tar(str(path))] == ["k0", "k1", "k2", "k3"]


@pytest.mark.parametrize("kind", ["gzip", "bz2"])
def test_a_compressed_tar_bomb_is_refused_quickly(tmp_path, monkeypatch, kind):
    """A few hundred bytes of bzip2 expanded to gigabytes of tar that tarfile's own decompression (no limit, a buffer
    copy per read) worked through for minutes; past MAX_TAR_EXPANSION x its compressed size the tar is a reject."""
    import io
    import tarfile
    import time

    monkeypatch.setattr(read, "EXPANSION_GRACE_BYTES", 1 << 20)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("k0.junk")  # a member the reader skips unread
        info.size = 64 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    path = tmp_path / "bomb.tar"
    path.write_bytes(COMPRESSORS[kind](raw.getvalue()))
    assert path.stat().st_size < 100_000
    started = time.perf_counter()
    items = _iter_tar(str(path))
    assert time.perf_counter() - started < 5
    assert len(items) == 1 and f"expands more than {read.MAX_TAR_EXPANSION}x" in items[0].reason


def test_an_intact_tar_has_no_end_reject(make_tar, tmp_path):
    """The end check passes tars with their end marker: plain, gzip-compressed and with records of zero padding."""
    import gzip
    import tarfile

    path = make_tar("ok.tar", FOUR_KEYS)
    assert [i.key for i in _iter_tar(path)] == ["k0", "k1", "k2", "k3"]
    gz = tmp_path / "ok.tar.gz"
    gz.write_bytes(gzip.compress(open(path, "rb").read()))
    assert [i.key for i in _iter_tar(str(gz))] == ["k0", "k1", "k2", "k3"]
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    assert _iter_tar(str(tmp_path / "empty.tar")) == []


def test_link_members_reject_their_key(tmp_path):
    """A key whose image is a symbolic or hard link is a not_a_file reject (links are never followed), not dropped
    silently or misreported as missing_image; links under names the reader does not use are skipped."""
    import io
    import tarfile

    path = tmp_path / "links.tar"
    with tarfile.open(path, "w") as tar:
        def add(name, data=None, kind=None, target=None):
            info = tarfile.TarInfo(name)
            if kind is None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.type, info.linkname = kind, target
                tar.addfile(info)

        add("a.jpg", b"img")
        add("a.txt", b"cap")
        add("only.jpg", kind=tarfile.SYMTYPE, target="a.jpg")
        add("hard.jpg", kind=tarfile.LNKTYPE, target="a.jpg")
        add("hard.txt", b"cap")
        add("b.jpg", b"img")
        add("b.txt", b"cap")
        add("b.extra", kind=tarfile.SYMTYPE, target="/etc/passwd")
        add("c.txt", b"cap")
        add("c.jpg", kind=tarfile.SYMTYPE, target="a.jpg")
    items = _iter_tar(str(path))
    assert [(type(i).__name__, i.key) for i in items] == [
        ("RawSample", "a"), ("Reject", "only"), ("Reject", "hard"), ("RawSample", "b"), ("Reject", "c")]
    assert items[1].reason == "not_a_file: only.jpg is a symbolic link"
    assert items[2].reason == "not_a_file: hard.jpg is a hard link"
    assert items[4].reason == "not_a_file: c.jpg is a symbolic link"


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
    assert isinstance(items[1], Reject)
    assert items[1].reason == "malformed_caption_line: line 2: not JSON (Expecting property name enclosed in double " \
        "quotes at column 2)"
    assert items[2]["key"] == "b"  # the image's file stem: the name its ground truth has under panoptic/
    assert isinstance(items[3], Reject) and items[3].reason == "duplicate_key: line 4 repeats the key of line 1"
    assert len(items) == 4
    nested = [json.dumps({"image": f"{folder}/000.jpg", "caption": "c"}) for folder in ("cat", "dog")]
    assert list(read.iter_caption_lines(nested, "captions.jsonl"))[1].reason == (
        "duplicate_key: line 2 repeats the key of line 1; keys default to the image's file stem: give \"key\" to "
        "tell images of one name in different folders apart")
    odd = [json.dumps([1, 2]), json.dumps({"IMAGE": "x.jpg", "Caption": "c"})]
    first, second = read.iter_caption_lines(odd, "captions.jsonl")
    assert first.reason == "malformed_caption_line: line 1: a JSON list, not an object"
    assert second.reason == ("malformed_caption_line: line 2: no \"image\" (or \"file_name\") key; keys are "
                             "['Caption', 'IMAGE'] (names are case-sensitive)")


@pytest.mark.parametrize(("entry", "wrong"), [
    ({"key": "a", "image": ["images/x.jpg"], "caption": "c"}, '"image" is a list'),
    ({"key": "a", "image": 5, "caption": "c"}, '"image" is a int'),
    ({"image": "images/x.jpg", "caption": 123}, '"caption" is a int'),
    ({"image": "images/x.jpg", "caption": ["a", "b"]}, '"caption" is a list'),
    ({"key": {"k": 1}, "image": "images/x.jpg", "caption": "c"}, '"key" is a dict'),
    ({"key": True, "image": "images/x.jpg", "caption": "c"}, '"key" is a bool'),
])
def test_caption_lines_with_values_of_the_wrong_type_are_rejects(entry, wrong):
    [reject] = read.iter_caption_lines([json.dumps(entry)], "captions.jsonl")
    assert isinstance(reject, Reject) and reject.reason == f"malformed_caption_line: line 1: {wrong}, not a " + (
        "string or integer" if wrong.startswith('"key"') else "string")


def test_caption_lines_keep_a_zero_key_and_read_past_a_byte_order_mark():
    lines = ['\ufeff' + json.dumps({"key": 0, "image": "images/other.jpg", "caption": "zero key"}),
             json.dumps({"image": "images/other.jpg", "caption": "same stem, other key"})]
    entries = list(read.iter_caption_lines([line.encode() for line in lines], "captions.jsonl"))
    assert [e["key"] for e in entries] == ["0", "other"]


def test_folder_entry_reads_image_and_ground_truth(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "panoptic").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "panoptic" / "a.png").write_bytes(b"png")
    (tmp_path / "panoptic" / "a.json").write_text(json.dumps({"segments_info": []}))
    raw = read.load_folder_entry({"key": "a", "image": "images/a.jpg", "caption": "c"}, str(tmp_path))
    assert raw.image_bytes == jpeg_bytes() and raw.annotation_png == b"png" and raw.annotation == {"segments_info": []}
    missing = read.load_folder_entry({"key": "b", "image": "images/b.jpg", "caption": "c"}, str(tmp_path))
    assert isinstance(missing, Reject) and missing.stage == "read"  # named but absent: the reject names the file
    assert missing.reason == f"missing_image: 'images/b.jpg' does not exist in {str(tmp_path)!r}"
    unnamed = read.load_folder_entry({"key": "c", "caption": "c"}, str(tmp_path))
    assert unnamed.image_bytes is None and unnamed.annotation_png is None  # decode rejects it: missing_image


def test_detect_format_and_brace_ranges(tmp_path, make_tar, monkeypatch):
    for i in range(3):
        make_tar(f"shard-{i:03d}.tar", [("k.txt", b"c")])
    assert read.expand_braces("s-{008..010}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar"]
    assert len(read.match_files(str(tmp_path / "shard-{000..001}.tar"))) == 2
    (tmp_path / "p.parquet").write_bytes(b"PAR1" + bytes(600))  # a forced format that does not fit fails at launch
    with pytest.raises(ValueError, match="'.*p.parquet' is a Parquet file, which --input-format webdataset cannot"):
        read.check_input(str(tmp_path / "p.parquet"), read.ReadOptions("webdataset"))
    (tmp_path / "bad.tar").write_bytes(b"garbage")  # a damaged tar is not refused here: the job rejects it
    assert read.check_input(str(tmp_path / "bad.tar"), read.ReadOptions("webdataset")) == "webdataset"
    assert read.check_input(str(tmp_path / "shard-000.tar"), read.ReadOptions("webdataset")) == "webdataset"
    monkeypatch.chdir(tmp_path)  # a bare pattern in the current directory, given back as spelled
    assert read.match_files("shard-*.tar") == ["shard-000.tar", "shard-001.tar", "shard-002.tar"]
    assert read.match_files("shard-{000..001}.tar") == ["shard-000.tar", "shard-001.tar"]
    assert read.detect_format(str(tmp_path / "*.tar")) == "webdataset"
    (tmp_path / "captions.jsonl").write_text("")
    assert read.detect_format(str(tmp_path)) == "folder"
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match="cannot detect the format"):
        read.detect_format(str(tmp_path / "*"))
    with pytest.raises(ValueError, match="matches no file"):
        read.detect_format(os.path.join(str(tmp_path), "nothing-*.tar"))


def test_a_brace_range_with_a_missing_file_fails_at_launch(tmp_path, make_tar):
    for i in (0, 2):
        make_tar(f"shard-{i:03d}.tar", [("k.txt", b"c")])
    options = read.ReadOptions()
    assert read.check_input(str(tmp_path / "shard-{000..000}.tar"), options) == "webdataset"
    assert read.check_input(str(tmp_path / "shard-*.tar"), options) == "webdataset"  # a glob reads whichever exist
    with pytest.raises(ValueError, match=r"1 of the 3 files its brace range names do not exist, e.g. .*shard-001"):
        read.check_input(str(tmp_path / "shard-{000..002}.tar"), options)


def test_a_repeated_key_is_one_reject_however_many_members_it_has(make_tar, monkeypatch):
    monkeypatch.setattr(read, "MAX_MEMBER_BYTES", 10)
    sample = [("k1.jpg", b"i"), ("k1.txt", b"c"), ("k1.json", b"{}"), ("k1.panoptic.png", b"p")]
    path = make_tar("d.tar", [*sample, ("k2.jpg", b"i"), *sample, ("k3.jpg", b"y" * 11), ("k3.txt", b"c"),
                              ("k4.jpg", b"i")])
    items = _iter_tar(path)
    assert [(type(i).__name__, i.key) for i in items] == [
        ("RawSample", "k1"), ("RawSample", "k2"), ("Reject", "k1"), ("Reject", "k3"), ("RawSample", "k4")]
    assert items[2].reason == "duplicate_key" and items[3].reason.startswith("member_too_large")


def test_a_caption_that_is_not_utf8_is_a_reject_not_replacement_characters(make_tar, tmp_path):
    items = _iter_tar(make_tar("e.tar", [("k1.jpg", b"i"), ("k1.txt", "café".encode("latin-1"))]))
    assert len(items) == 1 and isinstance(items[0], Reject)
    assert items[0].reason.startswith(read.BAD_CAPTION_ENCODING) and "k1.txt" in items[0].reason
    lines = [json.dumps({"image": "a.jpg", "caption": "café"}, ensure_ascii=False).encode("latin-1"), b"\n"]
    [reject] = read.iter_caption_lines(lines, "captions.jsonl")
    assert isinstance(reject, Reject) and reject.reason.startswith(read.BAD_CAPTION_ENCODING)


def test_folder_entries_outside_the_corpus_root_are_rejected(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "secret.jpg").write_bytes(jpeg_bytes())
    root = str(tmp_path / "corpus")
    for image in ("../secret.jpg", str(tmp_path / "secret.jpg"), "images/../../secret.jpg", "gs://other/x.jpg"):
        [entry] = read.iter_caption_lines([json.dumps({"image": image, "caption": "c"})], "captions.jsonl")
        item = read.load_folder_entry(entry, root)
        assert isinstance(item, Reject) and item.reason.startswith(read.OUTSIDE_CORPUS), image
    escaping_key = read.load_folder_entry({"key": "../x", "image": "a.jpg", "caption": "c"}, root)
    assert isinstance(escaping_key, Reject) and "key '../x'" in escaping_key.reason


def test_auto_segmenter_probe_skips_unreadable_and_empty_tars(tmp_path, make_tar):
    (tmp_path / "a-0.tar").write_bytes(b"")  # zero bytes: tarfile.ReadError
    make_tar("a-1.tar", [])  # a valid tar without members
    (tmp_path / "a-2.tar").write_bytes(b"\x00garbage" * 100)
    make_tar("a-3.tar", [("k.jpg", b"i"), ("k.txt", b"c"), ("k.json", b"{}"), ("k.panoptic.png", b"p")])
    assert read.has_annotations(str(tmp_path / "a-*.tar"), "auto") is True
    make_tar("b-0.tar", [])
    make_tar("b-1.tar", [("k.jpg", b"i"), ("k.txt", b"c")])
    assert read.has_annotations(str(tmp_path / "b-*.tar"), "auto") is False
    # nothing readable: no sample can reach a segmenter; `annotations` loads no model and all inputs become rejects
    assert read.has_annotations(str(tmp_path / "a-[02].tar"), "webdataset") is True


def test_a_gzipped_tar_reads_through_beam_with_the_webdataset_format(make_tar, tmp_path, monkeypatch):
    """Beam opens tars uncompressed: a .tar.gz is decompressed by the reader's own bounded stream, so its expansion
    limit holds there too (Beam's automatic decompression by file name would bypass it)."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "shard.tar.gz").write_bytes(gzip.compress(open(make_tar("p.tar", FOUR_KEYS), "rb").read()))
    options = read.ReadOptions(input_format="webdataset")
    with beam.Pipeline(runner="DirectRunner") as p:
        out = p | read.ReadCorpus(str(tmp_path / "c" / "*.tar.gz"), options)
        assert_that(out["samples"] | beam.Map(lambda s: s.key), equal_to(["k0", "k1", "k2", "k3"]))
    monkeypatch.setattr(read, "EXPANSION_GRACE_BYTES", 0)  # in-process DirectRunner: a limit this tar passes
    monkeypatch.setattr(read, "MAX_TAR_EXPANSION", 2)
    with beam.Pipeline(runner="DirectRunner") as p:
        out = p | read.ReadCorpus(str(tmp_path / "c" / "*.tar.gz"), options)
        assert_that(out["samples"], equal_to([]), label="NoSamples")
        reasons = out["rejects"] | beam.Map(lambda r: r.reason.split(" (")[0])
        assert_that(reasons, equal_to(["unreadable_tar: the compressed tar expands more than 2x"]), label="Refused")
