"""Crafted inputs from a security review: files named by a corpus, a benchmark or a scene must stay inside their
folder (symlinks resolved), be regular files and have bounded sizes; nesting that breaks the JSON parser is a reject;
pickled weights are refused with a one-line message."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import jpeg_bytes
from spatext.pipeline import read, read_parquet
from spatext.pipeline.read import FileRefused, ReadOptions, iter_webdataset, load_folder_entry, read_optional
from spatext.pipeline.records import RawSample, Reject


def test_a_folder_corpus_does_not_follow_a_symlink_out_of_its_root(tmp_path):
    root, outside = tmp_path / "corpus", tmp_path / "secret.jpg"
    (root / "images").mkdir(parents=True)
    outside.write_bytes(jpeg_bytes())
    os.symlink(outside, root / "images" / "link.jpg")
    item = load_folder_entry({"key": "k", "image": "images/link.jpg", "caption": "c"}, str(root))
    assert isinstance(item, Reject) and item.reason.startswith("path_outside_corpus: ")
    (root / "images" / "ok.jpg").write_bytes(jpeg_bytes())
    assert isinstance(load_folder_entry({"key": "k", "image": "images/ok.jpg", "caption": "c"}, str(root)), RawSample)


def test_corpus_files_must_be_regular_and_bounded(tmp_path):
    os.mkfifo(tmp_path / "fifo.jpg")  # reading it would block forever
    with pytest.raises(FileRefused, match="not_a_file"):
        read_optional(str(tmp_path / "fifo.jpg"), str(tmp_path))
    (tmp_path / "big.jpg").write_bytes(b"x" * 11)
    with pytest.raises(FileRefused, match=r"member_too_large: .*big.jpg' has 11 bytes \(limit 10\)"):
        read_optional(str(tmp_path / "big.jpg"), str(tmp_path), limit=10)
    assert read_optional(str(tmp_path / "big.jpg"), str(tmp_path), limit=11) == b"x" * 11
    assert read_optional(str(tmp_path / "none.jpg"), str(tmp_path)) is None


def test_tar_members_a_sample_does_not_use_are_skipped_unread(make_tar, monkeypatch):
    monkeypatch.setattr(read, "MAX_MEMBER_BYTES", 1000)  # the used members' cap, here small
    path = make_tar("extra.tar", [("k.jpg", jpeg_bytes()[:900]), ("k.txt", b"caption"),
                                  *[(f"k.x{i}", b"0" * 5000) for i in range(3)]])
    with open(path, "rb") as handle:
        items = list(iter_webdataset(handle, path))
    assert len(items) == 1 and isinstance(items[0], RawSample) and items[0].caption == "caption"


def test_json_nested_beyond_the_parser_is_a_reject_not_a_crash(make_tar):
    deep = b"[" * 200_000 + b"]" * 200_000
    path = make_tar("deep.tar", [("k.jpg", jpeg_bytes()), ("k.txt", b"c"), ("k.json", deep)])
    with open(path, "rb") as handle:
        (item,) = list(iter_webdataset(handle, path))
    assert item.annotation == {"segments_info": None, "error": "malformed json"}  # decode rejects it if it is needed
    (line,) = read.iter_caption_lines([deep.decode()], "captions.jsonl")
    assert line.reason == "malformed_caption_line: line 1: nested deeper than the JSON parser goes"


def test_parquet_images_and_row_groups_over_the_caps_are_rejects(tmp_path, monkeypatch):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"key": ["a", "b", "c"], "jpg": [b"x" * 10, b"y" * 50, b"z" * 10],
                             "txt": ["t"] * 3}), path, row_group_size=2)
    monkeypatch.setattr(read_parquet, "MAX_MEMBER_BYTES", 20)
    with open(path, "rb") as handle:
        items = list(read_parquet.iter_parquet(handle, str(path), ReadOptions()))
    assert [type(i).__name__ for i in items] == ["RawSample", "Reject", "RawSample"]
    assert items[1].reason == "member_too_large: column 'jpg' holds 50 bytes (limit 20)"
    meta = pq.ParquetFile(path).metadata
    sizes = [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]  # every column is read
    assert sizes[0] > sizes[1]  # 60 bytes of images against 10
    monkeypatch.setattr(read_parquet, "MAX_COLUMN_CHUNK_BYTES", sizes[1])  # the first row group is refused unread
    with open(path, "rb") as handle:
        items = list(read_parquet.iter_parquet(handle, str(path), ReadOptions()))
    assert [i.key for i in items] == ["p/0", "p/1", "c"]
    assert items[0].reason.startswith("member_too_large: row group 0's columns jpg, txt, key unpack to")


@pytest.mark.parametrize("column", ["txt", "key", "url"])
def test_parquet_cells_over_the_cap_in_any_column_are_rejects(tmp_path, monkeypatch, column):
    """Not only the image: a caption, key or URL cell over MAX_MEMBER_BYTES is a reject of its row, found from
    Arrow's lengths before the row becomes Python objects."""
    path = tmp_path / "p.parquet"
    cells = {"key": ["a", "b", "c"], "jpg": [b"x"] * 3, "txt": ["t"] * 3, "url": ["u"] * 3}
    cells[column] = [cells[column][0], cells[column][1] * 50, cells[column][2]]
    pq.write_table(pa.table(cells), path)
    monkeypatch.setattr(read_parquet, "MAX_MEMBER_BYTES", 20)
    with open(path, "rb") as handle:
        items = list(read_parquet.iter_parquet(handle, str(path), ReadOptions()))
    assert [type(i).__name__ for i in items] == ["RawSample", "Reject", "RawSample"]
    assert items[1].key == "p/1" and items[1].reason == f"member_too_large: column {column!r} holds 50 bytes (limit 20)"


def test_a_dictionary_encoded_big_value_is_refused_without_becoming_python_bytes(tmp_path, monkeypatch):
    """One big value repeated by dictionary encoding: the footer's sizes are small, yet every row decodes to the
    value. Rows over the cap are refused from Arrow's lengths and never become Python bytes (tracemalloc sees
    Python's allocations, not Arrow's); HF image structs too."""
    import tracemalloc

    path = tmp_path / "d.parquet"
    big = {"bytes": bytes(1 << 20), "path": "x.jpg"}
    pq.write_table(pa.table({"image": [big] * 40, "text": ["t"] * 40}), path, use_dictionary=True)
    assert pq.ParquetFile(path).metadata.row_group(0).total_byte_size < 40 << 20
    monkeypatch.setattr(read_parquet, "MAX_MEMBER_BYTES", 1 << 19)
    tracemalloc.start()
    try:
        with open(path, "rb") as handle:
            items = list(read_parquet.iter_parquet(handle, str(path), ReadOptions()))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(items) == 40 and all(i.reason == f"member_too_large: column 'image' holds {(1 << 20) + 5} bytes "
                                    f"(limit {1 << 19})" for i in items)
    assert peak < 1 << 20  # not even one copy of the value as Python bytes

def test_a_benchmark_cannot_point_its_samples_outside_its_folder(demo_shards, tmp_path):
    from spatext.eval.benchmark_set import BenchmarkSpec, load_benchmark, make_benchmark

    bench = tmp_path / "bench"
    make_benchmark(BenchmarkSpec(shards=str(demo_shards), out=str(bench), protocol="filtered", num=2, seed=0))
    records = [json.loads(line) for line in (bench / "samples.jsonl").read_text().splitlines() if line.strip()]
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(secret)
    for value in (str(secret), "../secret.png"):
        evil = tmp_path / f"evil{len(value)}"
        shutil.copytree(bench, evil)
        changed = [{**records[0], "reference": value}, *records[1:]]
        (evil / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in changed))
        with pytest.raises(ValueError, match="samples.jsonl 'reference'.*not a relative path inside"):
            load_benchmark(str(evil))


def test_a_scene_mask_must_lie_in_the_scene_folder(tmp_path):
    from spatext.model.scene import load_scene

    (tmp_path / "scn").mkdir()
    Image.new("L", (8, 8), 255).save(tmp_path / "outside.png")
    for value in ("../outside.png", str(tmp_path / "outside.png")):
        (tmp_path / "scn" / "s.json").write_text(json.dumps({"prompt": "p", "regions": [{"prompt": "a",
                                                                                         "mask": value}]}))
        with pytest.raises(ValueError, match=r"regions\[0\].*mask: .* is not a path inside the scene file's folder"):
            load_scene(str(tmp_path / "scn" / "s.json"), (8, 8))


def test_pickled_segmenter_weights_are_one_line(monkeypatch):
    from spatext.pipeline.segmenters import mask2former
    from spatext.pipeline.segmenters.base import SegmenterSpec

    def pickled(*args, **kwargs):
        raise pickle.UnpicklingError("Weights only load failed. ...\nmore lines")

    monkeypatch.setattr(mask2former.Mask2FormerImageProcessor, "from_pretrained", lambda *a, **k: object())
    monkeypatch.setattr(mask2former.Mask2FormerForUniversalSegmentation, "from_pretrained", pickled)
    with pytest.raises(ValueError, match=r"^--segmenter-weights 'w': its weights file holds pickled objects .*"
                                         r"Cause: Weights only load failed\. \.\.\.$"):
        mask2former._pretrained("w", SegmenterSpec("mask2former"))


def test_read_optional_reads_a_remote_style_path_with_its_size_checked(tmp_path):
    data = io.BytesIO(b"abc").getvalue()
    (tmp_path / "f.bin").write_bytes(data)
    assert read_optional(str(tmp_path / "f.bin")) == b"abc"  # no root: any local path (the launcher's own files)


def test_read_optional_of_a_remote_file_checks_its_size_and_takes_one_gone_meanwhile_as_absent(tmp_path, monkeypatch):
    """On an object store (a GCS-like test filesystem: its NotFound is no OSError) a file listed, then deleted before
    it is read, is absent like one never there; not an error that fails the whole bundle."""
    from remote_fs import RemoteTestFileSystem

    monkeypatch.setattr(RemoteTestFileSystem, "root", str(tmp_path))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "f.bin").write_bytes(b"abc")
    assert read_optional("spatexttest://c/f.bin") == b"abc"
    with pytest.raises(FileRefused, match="has 3 bytes"):
        read_optional("spatexttest://c/f.bin", limit=2)
    opened = RemoteTestFileSystem.open

    def deleted_first(self, path, *args, **kwargs):  # noqa: ANN001, ANN202
        os.remove(self._local(path))
        return opened(self, path, *args, **kwargs)

    monkeypatch.setattr(RemoteTestFileSystem, "open", deleted_first)
    assert read_optional("spatexttest://c/f.bin") is None
    (tmp_path / "c" / "f.bin").write_bytes(b"abc")
    monkeypatch.setattr(RemoteTestFileSystem, "open", opened)
    described = RemoteTestFileSystem.metadata

    def deleted_before_its_size(self, path):  # noqa: ANN001, ANN202
        os.remove(self._local(path))
        return described(self, path)

    monkeypatch.setattr(RemoteTestFileSystem, "metadata", deleted_before_its_size)
    assert read_optional("spatexttest://c/f.bin") is None  # gone between the listing and the size lookup
    (tmp_path / "c" / "f.bin").write_bytes(b"abc")
    monkeypatch.setattr(RemoteTestFileSystem, "metadata", described)

    def forbidden(self, path, *args, **kwargs):  # noqa: ANN001, ANN202
        raise PermissionError(f"403 Forbidden: {path}")

    monkeypatch.setattr(RemoteTestFileSystem, "open", forbidden)
    with pytest.raises(PermissionError, match="403"):  # a file that is there but cannot be read: an error
        read_optional("spatexttest://c/f.bin")


def test_folder_lines_with_text_utf8_cannot_encode_are_rejects():
    """A lone surrogate escape in captions.jsonl would fail Beam's coder (and the whole job): a read reject."""
    lines = [b'{"image": "a.jpg", "caption": "bad \\ud800 text"}\n', b'{"image": "b\\udce9.jpg", "caption": "ok"}\n',
             b'{"image": "c.jpg", "caption": "fine"}\n']
    items = list(read.iter_caption_lines(lines, "captions.jsonl"))
    assert [i.reason.split(":")[0] if isinstance(i, Reject) else i["key"] for i in items] == [
        "bad_caption_encoding", "bad_name_encoding", "c"]
    assert items[1].key == "b\\udce9"  # written with a backslash escape, so the reject itself can be stored
    assert all(i.reason.encode("utf-8") for i in items[:2])


def test_a_ground_truth_label_utf8_cannot_encode_is_a_read_reject(make_tar):
    class Count:
        def inc(self, n=1):
            pass

    bad = json.dumps({"segments_info": [{"id": 1, "category": "bad \ud800 label"}]}).encode()
    path = make_tar("labels.tar", [("a.jpg", jpeg_bytes()), ("a.txt", b"c"), ("a.json", bad),
                                   ("b.jpg", jpeg_bytes()), ("b.txt", b"c")])
    with open(path, "rb") as handle:
        routed = [out for item in iter_webdataset(handle, path) for out in read.route_item(item, Count(), Count())]
    reject = routed[0].value
    assert reject.key == "a" and reject.reason.startswith("bad_label_encoding: the label 'bad \\ud800 label'")
    assert isinstance(routed[1], RawSample) and routed[1].key == "b"


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"


def _big_png(mode: str, side: int) -> bytes:
    """A PNG declaring side x side pixels in a few hundred KB (one colour compresses to almost nothing)."""
    buffer = io.BytesIO()
    Image.new(mode, (side, side)).save(buffer, "PNG")
    return buffer.getvalue()


def test_images_open_only_as_the_formats_a_corpus_uses(monkeypatch):
    """Pillow tries every plugin by default: EPS bytes went to Ghostscript. Every decoder of untrusted bytes now
    names the formats it opens (pipeline decode, shards, training loader), and EPS is an unreadable image."""
    from PIL import EpsImagePlugin

    from spatext.model.crops import decode_rgb
    from spatext.pipeline.decode import DecodeError, decode_image_info
    from spatext.pipeline.schema import decode_image

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: pytest.fail("EPS plugin was tried"))
    with pytest.raises(DecodeError, match="unsupported_image_format: looks like EPS, a format spatext does not read"):
        decode_image_info(EPS, 64)  # named from its first bytes by the plugin's accept check: never opened
    for decoder in (decode_image, decode_rgb):
        with pytest.raises(OSError, match="cannot identify image file"):
            decoder(EPS)
    assert decode_image(jpeg_bytes()).shape[2] == 3  # the usual formats still open


def test_a_training_row_whose_map_declares_too_many_pixels_is_refused_from_its_header(monkeypatch):
    """A 13000 x 13000 map in ~160 KB of PNG took 6.3 GB in the loader's reduction; its header is checked against
    the shards' image_size first. An image of another size than its map is refused before it is decoded."""
    from spatext.model import crops

    with pytest.raises(ValueError, match=r"segment_map is 6000x6000, over the shards' image_size 512"):
        crops.load_label_crop(_big_png("L", 6000), 64, max_side=512)
    small, size = crops.load_label_crop(_big_png("L", 512), 64, max_side=512)
    assert size == (512, 512) and small.size == (64, 64)
    monkeypatch.setattr(crops, "decode_jpeg", lambda *a, **k: pytest.fail("decoded before its size was checked"))
    with pytest.raises(ValueError, match=r"image is 64x48 but its segment map is 512x512"):
        crops.decode_rgb(jpeg_bytes(), expected=(512, 512))


def test_shard_dataset_caps_maps_at_the_largest_image_size_of_its_shards(demo_shards, tmp_path):
    """Shards of builds with different --image-size train together: the cap is the largest of their image sizes."""
    from spatext.model.data import ShardDataset
    from spatext.pipeline.schema import METADATA_PREFIX

    dataset = ShardDataset(str(demo_shards), resolution=32)
    side = int(dataset._metadata["image_size"])
    assert dataset.max_side == side > 0
    files = sorted((demo_shards / "shards").glob("*.parquet"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, path in enumerate(files[:2]):
        table = pq.read_table(path)
        meta = {**table.schema.metadata, f"{METADATA_PREFIX}image_size".encode(): str(side * (i + 1)).encode()}
        pq.write_table(table.replace_schema_metadata(meta), mixed / path.name)
    assert ShardDataset(str(mixed), resolution=32).max_side == 2 * side


def test_scene_images_over_the_pixel_cap_are_refused_from_their_header(tmp_path):
    from spatext.model.scene import MAX_SCENE_PIXELS, load_painted_scene, load_scene

    side = int(MAX_SCENE_PIXELS**0.5) + 1
    (tmp_path / "big.png").write_bytes(_big_png("L", side))
    (tmp_path / "s.json").write_text(json.dumps({"prompt": "p", "regions": [{"prompt": "a", "mask": "big.png"}]}))
    with pytest.raises(ValueError, match=rf"regions\[0\] \('a'\): mask .*big\.png'.*{side}x{side} pixels, over"):
        load_scene(str(tmp_path / "s.json"), (8, 8))
    (tmp_path / "colors.json").write_text(json.dumps({"prompt": "p", "colors": {"#ff0000": "a"}}))
    with pytest.raises(ValueError, match=rf"big\.png: {side}x{side} pixels, over"):
        load_painted_scene(str(tmp_path / "big.png"), str(tmp_path / "colors.json"), (8, 8))


def test_a_benchmark_refuses_huge_masks_and_files_named_twice(demo_shards, tmp_path, monkeypatch):
    from spatext.eval import benchmark_set
    from spatext.eval.benchmark_set import BenchmarkSpec, load_benchmark, make_benchmark

    bench = tmp_path / "bench"
    make_benchmark(BenchmarkSpec(shards=str(demo_shards), out=str(bench), protocol="filtered", num=2, seed=0))
    lines = (bench / "samples.jsonl").read_text().splitlines()
    twin = json.dumps({**json.loads(lines[0]), "key": "twin"})  # another sample naming the same files
    (bench / "samples.jsonl").write_text("\n".join([lines[0], twin]))
    with pytest.raises(ValueError, match=r"samples\.jsonl:2: '.*' is already named by line 1"):
        load_benchmark(str(bench))
    record = json.loads(lines[0])
    (bench / "m2").symlink_to("masks")  # another name of the same files, inside the folder
    (bench / "r2").symlink_to("reference")
    alias = json.dumps({**record, "key": "alias", "masks": "m2/" + record["masks"].split("/", 1)[1],
                        "reference": "r2/" + record["reference"].split("/", 1)[1]})
    (bench / "samples.jsonl").write_text("\n".join([lines[0], alias]))
    with pytest.raises(ValueError, match=r"samples\.jsonl:2: 'm2/.*' is already named by line 1"):
        load_benchmark(str(bench))
    (bench / "samples.jsonl").write_text("\n".join([lines[0], "[" * 100_000 + "]" * 100_000]))
    with pytest.raises(ValueError, match=r"samples\.jsonl:2: not a JSON line \(RecursionError"):
        load_benchmark(str(bench))
    with pytest.raises(ValueError, match=r"samples\.jsonl:2: not a JSON line \(RecursionError"):
        benchmark_set.benchmark_fingerprint(str(bench))
    (bench / "samples.jsonl").write_text(lines[0] + "\n")
    monkeypatch.setattr(benchmark_set, "MAX_BENCHMARK_PIXELS", 100)
    with pytest.raises(ValueError, match=r"masks, over the 100 pixels a benchmark image may have"):
        load_benchmark(str(bench))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # Pillow's own bomb error, at open: a named ValueError too
    with pytest.raises(ValueError, match=r"masks/.*reference/.*decompression bomb"):
        load_benchmark(str(bench))


def test_json_nested_beyond_the_parser_is_a_named_error(tmp_path):
    """RecursionError is no ValueError: it escaped as a traceback from scene, benchmark and checkpoint files."""
    from spatext.eval.outputs import read_info
    from spatext.model.scene import load_scene
    from spatext.model.train_preflight import read_json

    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "s.json").write_text(deep)
    with pytest.raises(ValueError, match=r"s\.json: cannot read a scene from it \(.*recursion"):
        load_scene(str(tmp_path / "s.json"), (8, 8))
    (tmp_path / "benchmark.json").write_text(deep)
    with pytest.raises(ValueError, match=r"benchmark\.json is not valid JSON \(RecursionError"):
        read_info(str(tmp_path), "benchmark.json", "spatext-benchmark", 1, "--benchmark", "benchmark set")
    with pytest.raises(ValueError, match=r"s\.json: not valid JSON \(RecursionError"):
        read_json(str(tmp_path / "s.json"))
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"list\.json: expected a JSON object, got list"):
        read_json(str(tmp_path / "list.json"))
    from spatext.model.config import read_config_json

    with pytest.raises(ValueError, match=r"--config 'x': not a readable JSON file \(maximum recursion"):
        read_config_json(tmp_path / "s.json", "x")


def test_dictionary_typed_columns_are_sized_by_their_values(tmp_path, monkeypatch):
    """A column stored with an Arrow dictionary type reads back as one: each row holds its index's value, so one big
    value repeated in every row is over the cap in every row (it was counted as 0 bytes and read into memory)."""
    path = tmp_path / "d.parquet"
    captions = pa.DictionaryArray.from_arrays(pa.array([0, 1, 0, None], pa.int32()), pa.array(["c" * 100, "short"]))
    pq.write_table(pa.table({"key": ["a", "b", "c", "d"], "jpg": [b"x"] * 4, "caption": captions}), path)
    assert pa.types.is_dictionary(pq.ParquetFile(path).schema_arrow.field("caption").type)
    monkeypatch.setattr(read_parquet, "MAX_MEMBER_BYTES", 50)
    with open(path, "rb") as handle:
        items = list(read_parquet.iter_parquet(handle, str(path), ReadOptions()))
    assert [(type(i).__name__, i.key) for i in items] == [
        ("Reject", "d/0"), ("RawSample", "b"), ("Reject", "d/2"), ("RawSample", "d")]
    assert items[0].reason == "member_too_large: column 'caption' holds 100 bytes (limit 50)"


def test_all_null_dictionary_and_extension_columns_are_sized(tmp_path, monkeypatch):
    """An all-null dictionary column has an empty dictionary (indexing it raised IndexError); an extension type
    (arrow.json) is sized by the values it stores."""
    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"key": ["a", "b"], "jpg": [b"x"] * 2,
                             "caption": pa.array(['"' + "c" * 100 + '"', '"s"'], pa.json_()),
                             "url": pa.array([None, None], pa.dictionary(pa.int32(), pa.string()))}), path)
    monkeypatch.setattr(read_parquet, "MAX_MEMBER_BYTES", 50)
    with open(path, "rb") as handle:
        items = list(read_parquet.iter_parquet(handle, str(path), ReadOptions()))
    assert [(type(i).__name__, i.key) for i in items] == [("Reject", "e/0"), ("RawSample", "b")]
    assert items[0].reason == "member_too_large: column 'caption' holds 102 bytes (limit 50)"


def test_a_column_type_that_cannot_be_sized_rejects_its_row_group(tmp_path):
    path = tmp_path / "m.parquet"
    captions = pa.array([[("k", "v")], [("k", "w")]], pa.map_(pa.string(), pa.string()))
    pq.write_table(pa.table({"key": ["a", "b"], "jpg": [b"x"] * 2, "caption": captions}), path)
    with open(path, "rb") as handle:
        items = list(read_parquet.iter_parquet(handle, str(path), ReadOptions(caption_column="caption")))
    assert [i.key for i in items] == ["m/0", "m/1"] and all(isinstance(i, Reject) for i in items)
    assert "unreadable_parquet: row group 0" in items[0].reason and "cannot be size-checked" in items[0].reason
