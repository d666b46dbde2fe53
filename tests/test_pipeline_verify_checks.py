"""`spatext verify` reports every damaged or inconsistent piece of a build as a violation naming its file (it used to
abort on some, or pass them), and the writer keeps the promises verify checks: page CRCs, shards within
`--target-shard-mb`.

Each test copies the session's demo build (12 PNG samples, 2 shards, no rejects) and breaks one thing.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spatext.pipeline import verify
from spatext.pipeline.schema import shard_schema
from spatext.pipeline.write import BLOB_COLUMNS, UNITS_DIR, _WriteUnit, leaf_columns, list_parquet


@pytest.fixture
def build(demo_shards, tmp_path):
    """A private copy of the demo build, to damage."""
    copy = tmp_path / "build"
    shutil.copytree(demo_shards, copy)
    return copy


def _kinds(report: verify.VerifyReport) -> set[str]:
    return {message.split(":", 1)[0] for _, _, message in report.violations}


def _edit_manifest(build, edit) -> None:
    path = build / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(edit(manifest)))


def test_a_damaged_rejects_file_is_reported_not_raised(build):
    """`truncate -s 50 rejects/X.parquet` made verify exit with pyarrow's 'magic bytes' error, naming no file."""
    (build / "rejects").mkdir(exist_ok=True)
    (build / "rejects" / "unit-a.parquet").write_bytes(open(list_parquet(str(build))[0], "rb").read()[:50])
    report = verify.verify_build(str(build), progress=False)
    assert "unreadable_rejects" in _kinds(report)
    assert "rejects/unit-a.parquet [-] unreadable_rejects: " in report.format()
    assert verify.main([str(build)]) == 1


@pytest.mark.parametrize(("content", "kind", "says"), [
    ("[1, 2]", "manifest", "manifest.json holds a JSON list, expected an object"),
    ('{"counts": null, "shards": []}', "manifest", "'counts' is None, expected an object"),
    ("{not json", "manifest", "cannot read manifest.json"),
])
def test_a_malformed_manifest_is_reported_not_raised(build, content, kind, says):
    """A list or `counts: null` raised AttributeError out of verify."""
    (build / "manifest.json").write_text(content)
    report = verify.verify_build(str(build), progress=False)
    assert kind in _kinds(report) and says in report.format()
    assert "build/manifest.json [-]" in report.format()


@pytest.mark.parametrize("config", [None, "x", "DROP"])
def test_a_manifest_without_its_config_is_reported(build, config):
    """verify said OK, and skipped the shard-size check, when the manifest's config was gone or not an object."""
    _edit_manifest(build, lambda m: {k: v for k, v in m.items() if k != "config"} if config == "DROP"
                   else {**m, "config": config})
    report = verify.verify_build(str(build), progress=False)
    assert not report.ok and "expected the build's settings (an object)" in report.format()


def test_a_non_integer_count_is_a_type_problem(build):
    _edit_manifest(build, lambda m: {**m, "counts": {**m["counts"], "accepted": "12", "read": 12.5}})
    report = verify.verify_build(str(build), progress=False)
    assert _kinds(report) == {"count_type"}, report.format()
    assert "counts.accepted is '12' (str)" in report.format() and "counts.read is 12.5 (float)" in report.format()


def _image_chunk(path: str) -> tuple[int, int]:
    """(offset, length) of the image column's bytes in row group 0."""
    parquet = pq.ParquetFile(path)
    names = [parquet.metadata.row_group(0).column(i).path_in_schema for i in range(parquet.metadata.num_columns)]
    column = parquet.metadata.row_group(0).column(names.index("image"))
    start = column.dictionary_page_offset or column.data_page_offset
    return start, column.total_compressed_size


def test_flipped_bytes_inside_an_image_fail_the_page_checksum(build):
    """Images are incompressible, so zstd stores them raw: 64 flipped bytes changed an image and verify said OK."""
    path = list_parquet(str(build))[0]
    before = pq.read_table(path, columns=["image"]).column("image").to_pylist()
    start, length = _image_chunk(path)
    data = bytearray(open(path, "rb").read())
    for i in range(start + length // 2, start + length // 2 + 64):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))
    after = pq.read_table(path, columns=["image"]).column("image").to_pylist()  # without CRCs: reads fine
    assert after != before
    report = verify.verify_build(str(build), progress=False)
    assert _kinds(report) == {"checksum"}, report.format()
    assert f"shards/{path.rsplit('/', 1)[1]} [-] checksum: row group 0" in report.format()


def test_an_image_in_another_format_than_declared(build):
    """The demo build declares PNG; a JPEG decodes fine, so only the format check sees it."""
    path = list_parquet(str(build))[0]
    table = pq.read_table(path)
    rows = table.to_pylist()
    with Image.open(io.BytesIO(rows[0]["image"])) as im:
        buffer = io.BytesIO()
        im.convert("RGB").save(buffer, format="JPEG")
    rows[0]["image"] = buffer.getvalue()
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    report = verify.verify_build(str(build), progress=False)
    assert [m for _, _, m in report.violations] == ["image_format: stored image is jpeg, shards declare png"]
    assert report.violations[0][1] == rows[0]["key"]


def test_manifest_reasons_and_units_are_checked_against_rejects_and_markers(build):
    _edit_manifest(build, lambda m: {**m, "counts": {**m["counts"], "rejected_by_reason": {"decode/x": 2}}})
    assert [m for _, _, m in verify.verify_build(str(build), progress=False).violations] == [
        "count_by_reason: decode/x: manifest 2, rejects hold 0"]
    _edit_manifest(build, lambda m: {**m, "counts": {**m["counts"], "rejected_by_reason": {}, "units": 7}})
    report = verify.verify_build(str(build), progress=False)
    assert _kinds(report) == {"count_units"} and "manifest says 7, _units/ holds markers for 2" in report.format()


def test_a_missing_units_folder_is_a_violation(build):
    """--resume trusts `_units/`; without it the build verified OK."""
    shutil.rmtree(build / UNITS_DIR)
    report = verify.verify_build(str(build), progress=False)
    assert _kinds(report) == {"units_missing"}, report.format()


def test_a_marker_listing_a_missing_file(build):
    marker = sorted((build / UNITS_DIR).glob("*.json"))[0]
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "shards": ["gone.parquet"]}))
    report = verify.verify_build(str(build), progress=False)
    assert "unit_marker: lists missing file(s): shards/gone.parquet" in report.format()


def test_a_temporary_file_left_in_shards_is_reported(build):
    """pyarrow.dataset reads every file in shards/, so a leftover .parquet.tmp is data to it: verify says so."""
    assert verify.verify_build(str(build), progress=False).ok
    shard = list_parquet(str(build))[0]
    for hidden in (".DS_Store", "_SUCCESS"):  # pyarrow.dataset skips names starting with "." or "_"
        shutil.copy(shard, build / "shards" / hidden)
    assert verify.verify_build(str(build), progress=False).ok
    shutil.copy(shard, shard + ".tmp")
    (build / "shards" / "sub").mkdir()
    shutil.copy(shard, build / "shards" / "sub" / "copy.parquet")  # read by pyarrow.dataset, not by verify's glob
    report = verify.verify_build(str(build), progress=False)
    assert _kinds(report) == {"stray_file"} and len(report.violations) == 2
    assert os.path.basename(shard) + ".tmp" in report.format() and "sub/copy.parquet" in report.format()


def test_shard_name_mismatch_and_duplicate_keys_name_the_files(build):
    names = sorted(p.name for p in (build / "shards").glob("*.parquet"))
    _edit_manifest(build, lambda m: {**m, "shards": [names[0], "renamed.parquet"]})
    shutil.copy(build / "shards" / names[0], build / "shards" / "copy.parquet")
    report = verify.verify_build(str(build), progress=False)
    text = report.format(limit=100)
    assert f"missing from shards/: renamed.parquet; not in the manifest: copy.parquet, {names[1]}" in text
    duplicates = [m for _, _, m in report.violations if m.startswith("duplicate_key")]
    assert duplicates and all(m.endswith(f"in copy.parquet, {names[0]}") for m in duplicates)


def test_worker_processes_give_the_same_report(build):
    """--processes N: the same violations in the same order, duplicates across shards and a damaged shard included."""
    names = sorted(p.name for p in (build / "shards").glob("*.parquet"))
    shutil.copy(build / "shards" / names[0], build / "shards" / "copy.parquet")
    (build / "shards" / names[1]).write_bytes(b"PAR1 not really parquet PAR1")
    serial = verify.verify_build(str(build), progress=False)
    parallel = verify.verify_build(str(build), progress=False, processes=2)
    assert parallel.violations == serial.violations and parallel.rows == serial.rows
    assert {"duplicate_key", "unreadable_shard"} <= _kinds(serial)


def test_a_damaged_key_chunk_in_a_shard_holding_a_duplicate_is_reported_not_raised(build):
    """Duplicates are confirmed by reading keys again: a damaged row group there is skipped (the first pass reports
    it), not an abort."""
    path = list_parquet(str(build))[0]
    table = pq.read_table(path)
    pq.write_table(table, path, row_group_size=3, write_page_checksum=True, compression="zstd")
    shutil.copy(path, build / "shards" / "copy.parquet")  # every key of this shard twice
    meta = pq.ParquetFile(path).metadata
    names = [meta.row_group(1).column(i).path_in_schema for i in range(meta.num_columns)]
    column = meta.row_group(1).column(names.index("key"))
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(open(path, "rb").read())
    for i in range(start + column.total_compressed_size - 8, start + column.total_compressed_size - 2):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))
    report = verify.verify_build(str(build), progress=False)
    assert {"duplicate_key", "checksum"} <= _kinds(report) or {"duplicate_key", "unreadable_shard"} <= _kinds(report)


def test_a_key_hash_collision_is_not_a_duplicate(build, monkeypatch):
    """Duplicates are found by 64-bit key hashes, then confirmed on the keys themselves."""
    monkeypatch.setattr(verify, "key_hash", lambda key: 7)  # every key collides
    report = verify.verify_build(str(build), progress=False)
    assert report.ok, report.format()


def _rows(count: int, seed: int, image_bytes: int = 9000) -> list[dict]:
    """Schema-v1 rows with incompressible 'images' (random bytes: the writer does not decode) and ~3 KB maps, whose
    min/max Parquet statistics used to add ~4 copies of the map to every row group."""
    rng = np.random.default_rng(seed)

    def blob(n: int) -> bytes:
        return rng.integers(0, 256, n, dtype=np.uint8).tobytes()

    def unit(d: int = 64) -> list[float]:
        v = rng.normal(size=d)
        return list(v / np.linalg.norm(v))

    return [{
        "key": f"k{seed}-{i:04d}", "caption": f"caption {i}", "image": blob(int(rng.integers(1, 2 * image_bytes))),
        "width": 64, "height": 48, "segment_map": blob(int(rng.integers(2000, 3600))),
        "segments": [{"index": 1, "area": 0.5, "bbox": [0, 0, 8, 8], "embedding": unit(), "label": "x", "score": None}],
        "image_embedding": unit(), "caption_embedding": unit(),
    } for i in range(count)]


def _write_unit(out, rows: list[dict], target: int, rows_per_group: int) -> list[str]:
    """Run the write stage's DoFn on one unit; returns its shard paths in order."""
    write = _WriteUnit(str(out), shard_schema({"image_format": "png"}), target, rows_per_group)
    (marker,) = write.process(("unit-a", {"rows": rows, "rejects": [], "read": [len(rows)]}))
    return [str(out / "shards" / name) for name in marker["shards"]]


@pytest.mark.parametrize(("target", "rows_per_group"), [(40_000, 3), (40_000, 1), (25_000, 2), (200_000, 256)])
def test_shards_stay_within_the_target_size(tmp_path, target, rows_per_group):
    """--target-shard-mb 0.1 --rows-per-group 3 gave shards of up to 122,435 B for a limit of 104,858 B."""
    rows = _rows(40, seed=1)
    paths = _write_unit(tmp_path / "a", rows, target, rows_per_group)
    tables = [pq.read_table(p) for p in paths]
    assert sum((t.column("key").to_pylist() for t in tables), []) == sorted(r["key"] for r in rows)
    for path, table in zip(paths, tables, strict=True):
        assert table.num_rows == 1 or len(open(path, "rb").read()) <= target, path
    again = _write_unit(tmp_path / "b", rows, target, rows_per_group)  # deterministic: the same files
    assert [open(p, "rb").read() for p in again] == [open(p, "rb").read() for p in paths]


def test_a_row_larger_than_the_target_gets_its_own_shard(tmp_path):
    rows = _rows(5, seed=2)
    rows[2]["image"] = bytes(range(256)) * 200  # 51 KB
    paths = _write_unit(tmp_path, rows, 20_000, 3)
    sizes = {pq.read_table(p).column("key").to_pylist()[0]: pq.read_metadata(p).num_rows for p in paths}
    assert sizes[rows[2]["key"]] == 1


def test_blob_columns_carry_no_statistics_or_dictionary(tmp_path):
    """The writer's per-column options reach nested leaves too (they are matched by full leaf path)."""
    (path,) = _write_unit(tmp_path, _rows(4, seed=3), 10**7, 256)
    group = pq.ParquetFile(path).metadata.row_group(0)
    columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    assert sorted(columns) == sorted(leaf_columns(shard_schema()))
    for name, column in columns.items():
        assert column.is_stats_set == (name not in BLOB_COLUMNS), name
        assert ("RLE_DICTIONARY" in column.encodings) == (name not in BLOB_COLUMNS), name


def test_verify_flags_a_shard_over_the_target(build):
    """A build written before the size fix (or by hand) is caught: the manifest's config holds the target."""
    _edit_manifest(build, lambda m: {**m, "config": {**m["config"], "target_shard_mb": 0.01}})
    config = json.loads((build / "build_config.json").read_text())  # edited alike: only the sizes are at fault
    (build / "build_config.json").write_text(json.dumps({**config, "target_shard_mb": 0.01}))
    report = verify.verify_build(str(build), progress=False)
    assert _kinds(report) == {"shard_size"}, report.format()
    assert "exceed --target-shard-mb 0.01 (10485 bytes)" in report.format()


def test_a_redone_unit_leaves_no_file_of_its_earlier_attempt(tmp_path):
    """A unit killed after its shards but before its marker, redone with fewer shards and no rejects, used to leave
    the earlier attempt's extra shards (duplicate rows) and rejects file behind."""
    from spatext.pipeline.records import Reject

    rows = _rows(40, seed=4)
    write = _WriteUnit(str(tmp_path), shard_schema({"image_format": "png"}), 40_000, 3)
    (first,) = write.process(("unit-a", {"rows": rows, "rejects": [Reject("bad", "unit-a", "decode", "x")],
                                         "read": [41]}))
    assert len(first["shards"]) > 2 and first["rejects"]
    (other,) = write.process(("unit-a2", {"rows": _rows(3, seed=5), "rejects": [Reject("b", "unit-a2", "read", "y")],
                                          "read": [4]}))  # another unit (its name extends unit-a's): kept
    (redo,) = write.process(("unit-a", {"rows": rows[:3], "rejects": [], "read": [3]}))
    assert len(redo["shards"]) == 1 and redo["rejects"] is None
    assert sorted(os.listdir(tmp_path / "shards")) == sorted(redo["shards"] + other["shards"])
    assert os.listdir(tmp_path / "rejects") == [other["rejects"]]


def _rewrite_shard(path, rows=None, metadata=None) -> None:
    """Rewrite one shard with edited rows (pylist) and/or edited spatext metadata, keeping the schema's types."""
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    for key, value in (metadata or {}).items():
        name = f"spatext.{key}".encode()
        if value is None:
            meta.pop(name, None)
        else:
            meta[name] = str(value).encode()
    schema = table.schema.with_metadata(meta)
    data = rows(table.to_pylist()) if rows else table.to_pylist()
    pq.write_table(pa.Table.from_pylist(data, schema=schema), path, compression="zstd", write_page_checksum=True)


def _first_shard(build):
    return sorted((build / "shards").iterdir())[0]


def test_a_null_segment_is_reported_not_raised(build):
    """A None element in `segments` (the schema allows it) crashed verify with a TypeError."""
    _rewrite_shard(_first_shard(build), rows=lambda rows: [{**rows[0], "segments": [*rows[0]["segments"], None]},
                                                           *rows[1:]])
    report = verify.verify_build(str(build), progress=False)
    assert "undecodable" in _kinds(report), report.format()


@pytest.mark.parametrize(("metadata", "says"), [
    ({"clip_model": "ViT-L-14"}, "metadata_differs: clip_model is"),
    ({"clip_pretrained": None, "created": None}, "metadata: missing clip_pretrained, created"),
    ({"embed_dim": "64 "}, "metadata: embed_dim is '64 ', expected an integer"),
    ({"table": "rejects"}, "metadata: table is 'rejects', expected 'samples'"),
    ({"k_max": 0}, "segment_count: "),
    ({"min_area": 0.99}, "segment_area: segments "),
    ({"image_size": 16}, "image_size: "),
])
def test_shard_metadata_is_part_of_the_contract(build, metadata, says):
    """Each of these passed verify: missing DESIGN keys, shards of two CLIP models, rows breaking declared settings."""
    _rewrite_shard(_first_shard(build), metadata=metadata)
    report = verify.verify_build(str(build), progress=False)
    assert not report.ok and says in report.format(), report.format()


def test_a_segment_map_that_is_not_png_is_reported(build):
    def as_tiff(rows):
        buffer = io.BytesIO()
        Image.open(io.BytesIO(rows[0]["segment_map"])).save(buffer, format="TIFF")
        return [{**rows[0], "segment_map": buffer.getvalue()}, *rows[1:]]

    _rewrite_shard(_first_shard(build), rows=as_tiff)
    report = verify.verify_build(str(build), progress=False)
    assert "undecodable: segment_map must be a PNG, got TIFF" in report.format()


def test_a_segment_map_pillow_cannot_identify_is_named_as_the_segment_map(build):
    """Both the image and the map decode in one call: the finding names the one Pillow could not identify."""
    ppm = io.BytesIO()
    Image.new("L", (8, 8)).save(ppm, format="PPM")
    _rewrite_shard(_first_shard(build), rows=lambda rows: [{**rows[0], "segment_map": ppm.getvalue()}, *rows[1:]])
    report = verify.verify_build(str(build), progress=False)
    assert "undecodable: segment_map: unsupported_image_format: looks like PPM" in report.format()


def test_a_negative_limit_is_a_usage_error(build, capsys):
    with pytest.raises(SystemExit) as exit_info:  # -1 listed all but the last violation and miscounted the rest
        verify.main([str(build), "--limit", "-1"])
    assert exit_info.value.code == 2 and "--limit must be >= 0" in capsys.readouterr().err


def test_a_missing_or_disagreeing_build_config_is_reported(build):
    """A --resume needs build_config.json; one that says another seed than the manifest is a build of two launches."""
    assert verify.verify_build(str(build), progress=False).ok
    config = json.loads((build / "build_config.json").read_text())
    (build / "build_config.json").write_text(json.dumps({**config, "seed": config["seed"] + 1,
                                                         "clip_batch_size": 999}))  # a resume may change this one
    report = verify.verify_build(str(build), progress=False)
    assert _kinds(report) == {"build_config"}
    assert f"differs from the manifest's config in seed ({config['seed'] + 1} vs {config['seed']})" in report.format()
    assert "clip_batch_size" not in report.format()
    (build / "build_config.json").unlink()
    report = verify.verify_build(str(build), progress=False)
    assert _kinds(report) == {"build_config"} and "cannot read build_config.json" in report.format()
