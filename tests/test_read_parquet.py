"""Parquet corpora (img2dataset, Hugging Face datasets): columns, rejects, streaming, build, resume; detection."""

from __future__ import annotations

import json

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_tar
from spatext.pipeline import build, read, verify
from spatext.pipeline.demo_corpus import encode_jpeg, generate_sample
from spatext.pipeline.read import ReadCorpus, ReadOptions
from spatext.pipeline.read_parquet import URL_ONLY, ParquetColumns, iter_parquet, resolve_columns
from spatext.pipeline.records import RawSample, Reject
from spatext.pipeline.write import list_parquet

SEED = 7
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TINY_BUILD = [
    "--clip-model", "spatext-tiny", "--clip-pretrained", "none", "--image-format", "png", "--image-size", "128",
    # Parquet corpora carry no ground truth: a tiny random-init Mask2Former with every threshold at 0, since
    # random weights score nothing above the defaults (as in test_build's mask2former test).
    "--segmenter", "mask2former", "--segmenter-weights", "none", "--segmenter-config", "mask2former-tiny",
    "--segmenter-threshold", "0", "--segmenter-mask-threshold", "0", "--segmenter-overlap-threshold", "0",
    "--segmenter-processor-size", "64", "--min-area", "0.01",
]


def _img2dataset_rows() -> list[dict]:
    """img2dataset's parquet output: 3 downloaded rows, a failed download, a URL-only row, one with nothing."""
    rows = []
    for i in range(3):
        s = generate_sample(i, SEED)
        rows.append({"key": f"{i:09d}", "url": f"https://example.com/{i}.jpg", "caption": s.caption,
                     "status": "success", "error_message": None, "width": s.image.shape[1],
                     "height": s.image.shape[0], "jpg": encode_jpeg(s.image)})
    empty = {"width": None, "height": None, "jpg": None, "error_message": None, "caption": "a caption"}
    rows.append({**empty, "key": "000000003", "url": "https://example.com/3.jpg", "status": "failed_to_download",
                 "error_message": "HTTP Error 404: Not Found"})
    rows.append({**empty, "key": "000000004", "url": "https://example.com/4.jpg", "status": None})
    rows.append({**empty, "key": "000000005", "url": None, "status": None})
    return rows


def _hf_rows() -> list[dict]:
    """Hugging Face datasets: an Image struct {bytes, path} and a text column, no key column."""
    rows = [{"image": {"bytes": encode_jpeg(generate_sample(i, SEED).image), "path": f"{i}.jpg"},
             "text": generate_sample(i, SEED).caption} for i in range(3, 5)]
    rows.append({"image": {"bytes": None, "path": "https://example.com/x.jpg"}, "text": "remote only"})
    rows.append({"image": None, "text": "nothing at all"})
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("parquet_corpus")
    pq.write_table(pa.Table.from_pylist(_img2dataset_rows()), root / "00000.parquet", row_group_size=2)
    hf = pa.Table.from_pylist(_hf_rows(), schema=pa.schema([("image", HF_IMAGE), ("text", pa.string())]))
    pq.write_table(hf, root / "train-00000-of-00001.parquet")
    return root


def _items(path, options: ReadOptions | None = None, batch_rows: int = 64) -> list:
    with open(path, "rb") as handle:
        return list(iter_parquet(handle, str(path), options or ReadOptions(), batch_rows))


def test_img2dataset_rows_become_samples_and_reasoned_rejects(corpus):
    path = corpus / "00000.parquet"
    columns = resolve_columns(pq.read_schema(path), str(path), ReadOptions())
    assert columns == ParquetColumns("jpg", "caption", "key", "url", "status", "error_message")
    items = _items(path, batch_rows=3)  # row groups of 2, batches of 3: streamed across both
    assert [i.key for i in items] == [f"{i:09d}" for i in range(6)]
    assert all(isinstance(i, RawSample) and i.image_bytes and i.caption for i in items[:3])
    assert items[0].image_bytes == _img2dataset_rows()[0]["jpg"] and items[0].source == str(path)
    assert (items[3].stage, items[3].reason) == ("read", "download_failed: HTTP Error 404: Not Found")
    assert isinstance(items[4], Reject) and items[4].reason == URL_ONLY
    assert isinstance(items[5], RawSample) and items[5].image_bytes is None  # decode rejects it: missing_image


def test_hf_struct_images_and_keys_from_the_file_name(corpus):
    path = corpus / "train-00000-of-00001.parquet"
    columns = resolve_columns(pq.read_schema(path), str(path), ReadOptions())
    assert (columns.image, columns.caption, columns.key, columns.url) == ("image", "text", None, None)
    items = _items(path)
    assert [i.key for i in items] == [f"train-00000-of-00001/{i}" for i in range(4)]
    assert items[0].image_bytes == _hf_rows()[0]["image"]["bytes"] and items[0].caption == _hf_rows()[0]["text"]
    assert isinstance(items[2], Reject) and items[2].reason == URL_ONLY  # struct path is a URL, no bytes
    assert isinstance(items[3], RawSample) and items[3].image_bytes is None


def test_explicit_columns_bad_columns_and_broken_files(tmp_path):
    path = tmp_path / "custom.parquet"
    pq.write_table(pa.table({"uid": ["a", "a"], "picture": [b"x", b"y"], "alt": ["c1", "c2"], "URL": ["u", "v"]}),
                   path)
    schema = pq.read_schema(path)
    with pytest.raises(ValueError, match=r"custom\.parquet.*no image column.*picture \(binary\)"):
        resolve_columns(schema, str(path), ReadOptions())
    with pytest.raises(ValueError, match=r"--caption-column 'caption' is not a column of .*custom\.parquet.*alt"):
        resolve_columns(schema, str(path), ReadOptions(image_column="picture", caption_column="caption"))
    options = ReadOptions(image_column="picture", caption_column="alt", key_column="uid")
    columns = resolve_columns(schema, str(path), options)
    assert (columns.image, columns.caption, columns.key, columns.url) == ("picture", "alt", "uid", "URL")
    items = _items(path, options)
    assert items[0].image_bytes == b"x" and items[1].reason == "duplicate_key"
    # URL-only metadata (e.g. LAION's URL/TEXT parquet) fails fast at pipeline construction, naming the file.
    pq.write_table(pa.table({"URL": ["u"], "TEXT": ["t"]}), tmp_path / "meta.parquet")
    with pytest.raises(ValueError, match=r"meta\.parquet.*download images first.*URL \(string\), TEXT"):
        beam.Pipeline(runner="DirectRunner") | ReadCorpus(str(tmp_path / "meta.parquet"))
    with pytest.raises(ValueError, match=r"--coco-split applies to coco input only; --input is parquet"):
        ReadCorpus(str(path), ReadOptions(coco_split="val2017"))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(path.read_bytes()[:-30])
    assert [i.reason.split(":")[0] for i in _items(broken, options)] == ["unreadable_parquet"]
    pq.write_table(pa.table({"URL": ["u", "v", "w"], "TEXT": ["t"] * 3}), tmp_path / "meta3.parquet")
    unusable = _items(tmp_path / "meta3.parquet")  # a later file of a corpus: a reject per row, saying why
    assert [r.key for r in unusable] == ["meta3/0", "meta3/1", "meta3/2"]
    assert all(r.reason.startswith("unusable_columns: ") and "TEXT" in r.reason for r in unusable)


def test_a_damaged_row_group_rejects_its_rows_and_the_next_ones_are_read(tmp_path):
    """Damaged data in one row group: its rows are rejects, one each (the footer counts them), and the row groups
    after it are still read. Before, the rest of the file vanished with one reject and verify said OK."""
    path = tmp_path / "damaged.parquet"
    rows = [{"key": f"z{i}", "jpg": bytes([i]) * 500, "caption": f"c{i}"} for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2, compression="none")
    offset = pq.ParquetFile(path).metadata.row_group(1).column(1).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 40] = b"\xee" * 40  # row group 1's image page header
    path.write_bytes(bytes(data))
    items = _items(path, batch_rows=1)
    assert [(type(i).__name__, i.key) for i in items] == [
        ("RawSample", "z0"), ("RawSample", "z1"), ("Reject", "damaged/2"), ("Reject", "damaged/3"),
        *[("RawSample", f"z{i}") for i in range(4, 8)]]
    assert all(i.reason.startswith("unreadable_parquet: row group 1, rows 2..3 unread") for i in items[2:4])
    assert [i.image_bytes for i in items[4:]] == [r["jpg"] for r in rows[4:]]
    data = bytearray(_plain_parquet(tmp_path, rows))
    at = data.find(b"c2")  # row group 1's first caption: bytes that are not UTF-8 (pyarrow raises UnicodeDecodeError)
    data[at : at + 2] = b"\xff\xfe"
    path.write_bytes(bytes(data))
    for batch_rows in (1, 3, 100):
        items = _items(path, batch_rows=batch_rows)
        assert [i.key for i in items] == ["z0", "z1", "damaged/2", "damaged/3", "z4", "z5", "z6", "z7"]
        assert all(isinstance(i, Reject) for i in items[2:4]) and isinstance(items[4], RawSample)


def _plain_parquet(tmp_path, rows) -> bytes:
    """`rows` written uncompressed in row groups of 2 (their bytes findable in the file)."""
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2, compression="none")
    return path.read_bytes()


def test_unusable_columns_fail_before_output_is_touched(tmp_path):
    """The column check runs with the launcher's other checks, before --output is written: the rerun with the
    right column flags then starts there. Before, build_config.json was written first and refused that rerun."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sample = generate_sample(0, seed=0)
    pq.write_table(pa.table({"uid": ["a"], "photo": [encode_jpeg(sample.image)], "alt_text": [sample.caption]}),
                   corpus / "custom.parquet")
    out = tmp_path / "out"
    argv = ["--input", str(corpus / "*.parquet"), "--output", str(out), *TINY_BUILD]
    with pytest.raises(ValueError, match=r"custom\.parquet.*no image column.*photo"):
        build.run(argv)
    with pytest.raises(ValueError, match=r"--image-column 'foto' is not a column"):
        build.run([*argv, "--image-column", "foto", "--caption-column", "alt_text"])
    assert not (out / "build_config.json").exists()
    manifest = build.run([*argv, "--image-column", "photo", "--caption-column", "alt_text", "--key-column", "uid"])
    assert manifest["counts"]["read"] == 1


def test_binary_captions_are_decoded_or_rejected(tmp_path):
    """A binary caption column: UTF-8 bytes are the caption's text; other bytes are a reject, never "b'...'" text."""
    path = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"key": ["a", "b"], "image": [b"x", b"y"],
                             "caption": ["café".encode(), "café".encode("latin-1")]}), path)
    sample, reject = _items(path)
    assert isinstance(sample, RawSample) and sample.caption == "café"
    assert isinstance(reject, Reject) and reject.key == "b"
    assert reject.reason.startswith("bad_caption_encoding: column 'caption' is not UTF-8")


def test_detect_format_for_every_format_and_a_mixed_folder(tmp_path, corpus):
    assert read.detect_format(str(corpus / "*.parquet")) == "parquet"
    write_tar(str(tmp_path / "a.tar"), [("k.txt", b"c")])
    assert read.detect_format(str(tmp_path / "*.tar")) == "webdataset"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "captions.jsonl").write_text("")
    assert read.detect_format(str(tmp_path / "folder")) == "folder"
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "annotations" / "panoptic_val2017.json").write_text("{}")
    assert read.detect_format(str(tmp_path / "coco")) == "coco"
    for name in ("b.tar", "c.tar"):
        write_tar(str(tmp_path / name), [("k.txt", b"c")])
    (tmp_path / "d.parquet").write_bytes((corpus / "00000.parquet").read_bytes())
    with pytest.raises(ValueError, match=r"d\.parquet.*mixed input.*valid inputs"):
        read.detect_format(str(tmp_path / "*.*"))
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.md.*not a \.tar or \.parquet"):
        read.detect_format(str(tmp_path / "*.*"))


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("parquet_build")
    return out, build.run(["--input", str(corpus / "*.parquet"), "--output", str(out), *TINY_BUILD])


def test_build_counts_and_reject_reasons(built, corpus):
    out, manifest = built
    counts = manifest["counts"]
    assert counts["units"] == 2 and counts["read"] == 10 and counts["accepted"] + counts["rejected"] == 10
    by_reason = dict(counts["rejected_by_reason"])
    below = by_reason.pop("select/no_segment_above_threshold", 0)  # random weights: a segment may be too small
    assert by_reason == {"read/download_failed": 1, "read/url_only": 2, "decode/missing_image": 2}
    assert counts["accepted"] == 5 - below and counts["accepted"] >= 3
    rejects = pa.concat_tables([pq.read_table(p) for p in list_parquet(str(out), "rejects")]).to_pylist()
    assert {r["key"]: r["source"].rsplit("/", 1)[1] for r in rejects if r["reason"] == URL_ONLY} == {
        "000000004": "00000.parquet", "train-00000-of-00001/2": "train-00000-of-00001.parquet"}
    report = verify.verify_build(str(out), progress=False)
    assert report.ok, report.format()
    assert json.loads((out / "build_config.json").read_text())["input_format"] == "auto"


def test_resume_of_a_complete_parquet_build_does_nothing(built, corpus):
    out, manifest = built
    again = build.run(["--input", str(corpus / "*.parquet"), "--output", str(out), *TINY_BUILD, "--resume"])
    assert again["units_this_run"] == 0 and again["counts"] == manifest["counts"]


def test_image_column_must_hold_bytes(tmp_path):
    path = tmp_path / "paths.parquet"
    pq.write_table(pa.table({"image": ["a/path.jpg"], "caption": ["c"]}), path)
    with pytest.raises(ValueError, match=r"image column 'image' must hold bytes"):
        resolve_columns(pq.read_schema(path), str(path), ReadOptions())


def test_column_errors_suggest_binary_columns_and_flags_ignore_case(tmp_path):
    path = tmp_path / "mine.parquet"
    pq.write_table(pa.table({"MyKey": ["a"], "Photo": [b"x"], "Desc": ["d"], "url": ["u"]}), path)
    schema = pq.read_schema(path)
    with pytest.raises(ValueError, match=r"mine\.parquet.*pass --image-column Photo \(columns holding bytes: Photo\)"):
        resolve_columns(schema, str(path), ReadOptions())  # not "has URLs but no image bytes": Photo holds bytes
    columns = resolve_columns(schema, str(path), ReadOptions(image_column="photo", caption_column="DESC",
                                                             key_column="mykey"))
    assert (columns.image, columns.caption, columns.key) == ("Photo", "Desc", "MyKey")
