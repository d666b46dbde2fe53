"""Keys unique across the input set: duplicate keys across units become rejects (first unit wins), also on --resume;
Parquet default keys name the file relative to the input files' common folder."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import jpeg_bytes
from spatext.pipeline import build, verify
from spatext.pipeline.dedupe import KeyHashes, done_keys, winner
from spatext.pipeline.demo_corpus import write_corpus
from spatext.pipeline.read import ReadOptions
from spatext.pipeline.read_parquet import common_folder, iter_parquet, key_name
from spatext.pipeline.write import UNITS_DIR, list_files, read_json, read_markers

TINY = ["--clip-model", "spatext-tiny", "--clip-pretrained", "none", "--image-size", "128", "--image-format", "png"]


@pytest.fixture(scope="module")
def twin_corpus(tmp_path_factory):
    """The same 3-sample tar in two folders: every key is held by both units."""
    root = tmp_path_factory.mktemp("twins")
    write_corpus(str(root / "a"), 3, seed=4, fmt="webdataset", samples_per_shard=3)
    shutil.copytree(root / "a", root / "b")
    return root


def _build(corpus, out, *extra):
    return build.run(["--input", str(corpus / "*" / "shard-*.tar"), "--output", str(out), *TINY, *extra])


def test_winner_is_the_smallest_unit_whatever_the_order():
    read = [(1, "b.tar"), (1, "a.tar"), (1, "b.tar")]
    assert list(winner(("k", read))) == [("k", "a.tar")]
    assert list(winner(("k", [(1, "a.tar")]))) == []
    assert list(winner(("k", [(1, "a.tar"), (1, "a.tar")]))) == []  # one unit: the reader already deduplicated it
    # a unit completed earlier (rank 0) keeps its written copy, even against a unit whose name sorts first
    assert list(winner(("k", [(1, "a.tar"), (0, "c.tar")]))) == [("k", "c.tar")]


def _blake64(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def test_key_hashes_fold_and_merge_to_the_sorted_distinct_hashes(monkeypatch):
    monkeypatch.setattr(KeyHashes, "FOLD", 3)  # fold every 3 keys, so arrays and loose hashes mix
    keys = [f"k{i % 11}" for i in range(40)]
    combine = KeyHashes()
    parts = []
    for chunk in (keys[:17], keys[17:], []):
        accumulator = combine.create_accumulator()
        for key in chunk:
            accumulator = combine.add_input(accumulator, key)
        parts.append(accumulator)
    got = combine.extract_output(combine.merge_accumulators(parts))
    assert got.dtype == np.uint64 and got.tolist() == sorted({_blake64(k) for k in keys})


def test_completed_keys_enter_the_shuffle_only_when_a_key_read_now_may_match(tmp_path):
    path = tmp_path / "shard.parquet"
    pq.write_table(pa.table({"key": ["a", "b", "c"]}), path)
    read_now = np.array(sorted({_blake64("b"), _blake64("z")}), dtype=np.uint64)
    assert [k for k, _ in done_keys(("u.tar", "shards", str(path)), read_now)] == ["b"]
    assert [k for k, _ in done_keys(("u.tar", "shards", str(path)))] == ["a", "b", "c"]  # no filter: all
    assert list(done_keys(("u.tar", "shards", str(path)), np.zeros(0, dtype=np.uint64))) == []


def test_duplicate_keys_across_units_are_rejected_and_verify_passes(twin_corpus, tmp_path):
    manifest = _build(twin_corpus, tmp_path / "out")
    counts = manifest["counts"]
    assert (counts["read"], counts["accepted"], counts["rejected"]) == (6, 3, 3), counts
    by_unit = {m["source"].split(os.sep)[-2]: m for m in read_markers(str(tmp_path / "out"))}
    assert by_unit["a"]["accepted"] == 3 and by_unit["b"]["rejected"] == 3  # first unit (by name) wins
    assert verify.verify_build(str(tmp_path / "out"), progress=False).ok


def _marker_of(out, folder: str) -> str:
    """The marker file of the unit read from `folder`/shard-00000.tar."""
    paths = list_files(str(out), UNITS_DIR, ".json")
    return next(p for p in paths if read_json(p)["source"].endswith(os.path.join(folder, "shard-00000.tar")))


def test_resume_keeps_keys_of_completed_units(twin_corpus, tmp_path):
    out = tmp_path / "out"
    _build(twin_corpus, out)
    os.remove(_marker_of(out, "b"))  # the losing unit is read again while the winning one is complete
    manifest = _build(twin_corpus, out, "--resume")
    assert manifest["units_this_run"] == 1
    assert (manifest["counts"]["accepted"], manifest["counts"]["rejected"]) == (3, 3)
    assert verify.verify_build(str(out), progress=False).ok
    os.remove(_marker_of(out, "a"))  # and the other way round
    manifest = _build(twin_corpus, out, "--resume")
    assert (manifest["counts"]["accepted"], manifest["counts"]["rejected"]) == (3, 3)
    assert verify.verify_build(str(out), progress=False).ok


def _corrupt_copy(source: str, dest: str, key: str) -> None:
    """A copy of a webdataset tar whose `key`.jpg holds bytes no decoder reads."""
    with tarfile.open(source) as src, tarfile.open(dest, "w") as out:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name == f"{key}.jpg":
                data = b"garbage"
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))


def test_a_losing_copy_that_fails_later_is_a_duplicate_and_resume_keeps_the_good_copy(twin_corpus, tmp_path):
    """b's copy of demo-000000 is corrupt; a's copy (first by name) wins. The losing copy's reject says duplicate_key
    (it lost at read), so a resume that finds b complete and a not still keeps a's good copy."""
    corpus = tmp_path / "corpus"
    shutil.copytree(twin_corpus / "a", corpus / "a")
    (corpus / "b").mkdir()
    _corrupt_copy(str(twin_corpus / "b" / "shard-00000.tar"), str(corpus / "b" / "shard-00000.tar"), "demo-000000")
    out = tmp_path / "out"
    full = _build(corpus, out)
    assert full["counts"]["rejected_by_reason"] == {"read/duplicate_key": 3}, full["counts"]
    b_rejects = pq.read_table(os.path.join(out, "rejects", read_json(_marker_of(out, "b"))["rejects"])).to_pylist()
    assert {(r["key"], r["stage"]) for r in b_rejects} == {(f"demo-00000{i}", "read") for i in range(3)}
    keys = sorted(pq.read_table(str(out / "shards"), columns=["key"]).column("key").to_pylist())
    assert keys == ["demo-000000", "demo-000001", "demo-000002"]
    a_marker = read_json(_marker_of(out, "a"))
    os.remove(_marker_of(out, "a"))  # a killed before its marker: b complete, a read again
    for name in a_marker["shards"]:
        os.remove(os.path.join(out, "shards", name))
    resumed = _build(corpus, out, "--resume")
    assert resumed["units_this_run"] == 1 and resumed["counts"] == full["counts"]
    assert sorted(pq.read_table(str(out / "shards"), columns=["key"]).column("key").to_pylist()) == keys
    assert verify.verify_build(str(out), progress=False).ok


def test_parquet_default_keys_are_unique_across_folders(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "default" / split).mkdir(parents=True)
        table = pa.Table.from_pylist([{"image": jpeg_bytes(), "caption": split}])
        pq.write_table(table, tmp_path / "default" / split / "0000.parquet")
    files = sorted(str(p) for p in tmp_path.glob("default/*/0000.parquet"))
    root = common_folder(files)
    assert root == str(tmp_path / "default")
    keys = [next(iter_parquet(f, f, ReadOptions("parquet"), root=root)).key for f in files]
    assert keys == ["test/0000/0", "train/0000/0"]
    assert key_name("/d/x/0000.parquet", common_folder(["/d/x/0000.parquet"])) == "0000"  # one folder: file stem
    assert common_folder(["gs://b/x/1.parquet", "gs://b/y/2.parquet"]) == "gs://b"


def test_completed_keys_read_only_the_key_column_of_a_remote_shard(tmp_path, monkeypatch):
    """A resume reads completed shards' keys: from gs:// or s3:// that must not download the images too."""
    from spatext.pipeline import parquet_files

    rng = np.random.default_rng(0)
    keys = [f"k{i}" for i in range(8)]
    table = pa.table({"key": keys, "image": [rng.bytes(200_000) for _ in keys]})
    path = str(tmp_path / "shard.parquet")
    pq.write_table(table, path, row_group_size=4)
    read_bytes = []

    class Counting(io.FileIO):
        def read(self, *args):
            data = super().read(*args)
            read_bytes.append(len(data))
            return data

        def readinto(self, buffer):
            count = super().readinto(buffer)
            read_bytes.append(count or 0)
            return count

    monkeypatch.setattr(parquet_files, "local_path", lambda p: None)  # as for a remote path
    monkeypatch.setattr(parquet_files, "_beam_open", lambda p: Counting(p, "rb"))
    got = [key for key, _ in done_keys(("unit", "shards", path))]
    assert got == keys
    assert 0 < sum(read_bytes) < 0.05 * os.path.getsize(path)  # the footer and the key chunks, not 1.6 MB of images
    assert list(done_keys(("unit", "shards", path), read_now=np.zeros(0, dtype=np.uint64))) == []  # nothing to match


def test_markers_are_read_once_until_they_change(tmp_path, monkeypatch):
    from spatext.pipeline import write

    (tmp_path / UNITS_DIR).mkdir()
    for name in ("a", "b"):
        (tmp_path / UNITS_DIR / f"{name}.json").write_text(f'{{"source": "{name}"}}')
    reads = []
    real = write.read_json
    monkeypatch.setattr(write, "read_json", lambda p: reads.append(p) or real(p))
    assert [m["source"] for m in read_markers(str(tmp_path))] == ["a", "b"] and len(reads) == 2
    assert [m["source"] for m in read_markers(str(tmp_path))] == ["a", "b"] and len(reads) == 2  # from memory
    (tmp_path / UNITS_DIR / "a.json").write_text('{"source": "a2", "x": 1}')  # rewritten (--overwrite)
    os.utime(tmp_path / UNITS_DIR / "a.json", (1e9, 1e9))
    assert [m["source"] for m in read_markers(str(tmp_path))] == ["a2", "b"] and len(reads) == 3
