"""Benchmark sets: protocols, determinism, the on-disk format and `spatext eval make-benchmark`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spatext.eval import cli
from spatext.eval.benchmark_set import (
    FEW_K,
    MIN_AREA,
    BenchmarkSpec,
    benchmark_fingerprint,
    file_stem,
    load_benchmark,
    make_benchmark,
    read_benchmark_info,
)
from spatext.pipeline.crop import mask_bbox
from spatext.pipeline.records import Embeddings, Sample, SelectedSegment
from spatext.pipeline.schema import sample_to_row, shard_schema

SIZE = 40  # images are SIZE x SIZE: a 9 x 9 square is 5.06% of the image, an 8 x 8 one 4%


def shard_sample(n: int) -> tuple[Sample, Embeddings]:
    """Sample n: five squares of sides 20, 12, 9, 8, 4 (areas 25%, 9%, 5.06%, 4%, 1%); the 12 one is unlabelled."""
    rng = np.random.default_rng(n)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    segment_map = np.zeros((SIZE, SIZE), dtype=np.uint8)
    corners = [(0, 0, 20), (0, 22, 12), (22, 0, 9), (22, 12, 8), (30, 30, 4)]
    labels = ["sky", None, "dog", "cat", "ball"]
    if n % 5 == 4:  # every fifth sample: only the small squares (no segment >= 5%)
        corners, labels = corners[3:], labels[3:]
    segments = []
    for index, ((y, x, side), label) in enumerate(zip(corners, labels, strict=True), start=1):
        segment_map[y : y + side, x : x + side] = index
        mask = segment_map == index
        segments.append(SelectedSegment(index, float(mask.mean()), mask_bbox(mask), label, None))
    sample = Sample(key=f"s{n:03d}", source="test", caption=f"caption {n}", image=image,
                    segment_map=segment_map, segments=tuple(segments))
    k = len(segments)
    return sample, Embeddings(np.ones((k, 4), np.float32) / 2, np.ones(4, np.float32) / 2, np.ones(4, np.float32) / 2)


def write_shards(folder: Path, samples: range, parts: int) -> Path:
    """Write the samples as `parts` Parquet shards (the build's layout: folder/shards/*.parquet)."""
    rows = [sample_to_row(*shard_sample(n), image_format="png") for n in samples]
    (folder / "shards").mkdir(parents=True)
    schema = shard_schema({"segmenter": "annotations", "min_area": 0.05, "k_max": 3, "clip_model": "test"})
    for p in range(parts):
        table = pa.Table.from_pylist(rows[p::parts], schema=schema)
        pq.write_table(table, folder / "shards" / f"part-{p:05d}.parquet")
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("src"), range(20), parts=2)


def build(shards: Path, out: Path, protocol: str, **kwargs) -> tuple[dict, list]:
    info = make_benchmark(BenchmarkSpec(shards=str(shards), out=str(out), protocol=protocol, **kwargs))
    return info, load_benchmark(str(out))


def prompts_of(samples) -> dict[str, list[str]]:
    return {s.key: s.local_prompts for s in samples}


def test_protocols_keep_the_right_regions(shards: Path, tmp_path: Path) -> None:
    info, samples = build(shards, tmp_path / "all", "all")
    assert len(samples) == 20 and info["skipped"] == {"no_region": 0, "unlabelled_regions": 16}
    prompts = prompts_of(samples)
    assert prompts["s000"] == ["sky", "dog", "cat", "ball"] and prompts["s004"] == ["cat", "ball"]
    info, samples = build(shards, tmp_path / "filtered", "filtered")
    assert len(samples) == 16 and info["skipped"]["no_region"] == 4  # s004, s009, ... hold only squares < 5%
    assert all(s.local_prompts == ["sky", "dog"] for s in samples)
    assert all(r.area >= MIN_AREA for s in samples for r in s.regions)
    info, samples = build(shards, tmp_path / "few", "few", seed=1)
    assert len(samples) == 16 and all(FEW_K[0] <= len(s.regions) <= FEW_K[1] for s in samples)
    assert {len(s.regions) for s in samples} == {1, 2}  # K ~ U[1, 3] capped by the 2 candidates
    assert all(set(s.local_prompts) <= {"sky", "dog"} for s in samples)


def test_masks_and_reference_round_trip(shards: Path, tmp_path: Path) -> None:
    _, samples = build(shards, tmp_path / "b", "all")
    sample = {s.key: s for s in samples}["s000"]
    source, _ = shard_sample(0)
    np.testing.assert_array_equal(sample.reference, source.image)
    assert [r.source_index for r in sample.regions] == [1, 3, 4, 5]  # the unlabelled segment 2 is left out
    for region in sample.regions:
        np.testing.assert_array_equal(sample.masks == region.index, source.segment_map == region.source_index)
        assert region.area == pytest.approx((sample.masks == region.index).mean(), abs=1e-6)
    assert sample.prompt == "caption 0" and sample.masks.dtype == np.uint8


@pytest.mark.parametrize("damage, message", [
    (lambda r: r.pop("regions"), r"samples\.jsonl:2: field 'regions' must be a list, got None"),
    (lambda r: r.update(prompt=3), r"samples\.jsonl:2: field 'prompt' must be a str, got 3"),
    (lambda r: r["regions"][0].pop("area"), r"samples\.jsonl:2: regions\[0\] must be an object with index"),
    (lambda r: r["regions"][0].update(index=True), r"samples\.jsonl:2: regions\[0\] must be an object"),
    (lambda r: r["regions"][0].update(colour="red"), r"samples\.jsonl:2: regions\[0\] must be an object"),
])
def test_a_damaged_samples_line_is_named(shards: Path, tmp_path: Path, damage, message) -> None:
    """A hand-edited samples.jsonl line missing a field, or with one of the wrong type: a ValueError naming the line
    and the field (the CLI's 'error:' line), not a KeyError traceback."""
    out = tmp_path / "b"
    build(shards, out, "all")
    path = out / "samples.jsonl"
    lines = path.read_text().splitlines()
    record = json.loads(lines[1])
    damage(record)
    lines[1] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        load_benchmark(str(out))
    path.write_text("\n".join([lines[0], "[1, 2]", *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match=r"samples\.jsonl:2: a record must be a JSON object, got list"):
        load_benchmark(str(out))


def data_files(folder: Path) -> list[Path]:
    """Every file of a benchmark folder but benchmark.json (which holds the creation time), relative, sorted."""
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.name != "benchmark.json")


def test_deterministic_and_independent_of_sharding(shards: Path, tmp_path: Path) -> None:
    resharded = write_shards(tmp_path / "resharded", range(20), parts=3)
    outputs = []
    for name, source in (("a", shards), ("b", shards), ("c", resharded)):
        build(source, tmp_path / name, "few", num=7, seed=5)
        outputs.append(tmp_path / name)
    files = data_files(outputs[0])
    assert len(files) == 1 + 2 * 7
    for other in outputs[1:]:
        assert data_files(other) == files
        for f in files:
            assert (other / f).read_bytes() == (outputs[0] / f).read_bytes(), f
    build(shards, tmp_path / "seed6", "few", num=7, seed=6)
    assert (tmp_path / "seed6" / "samples.jsonl").read_bytes() != (outputs[0] / "samples.jsonl").read_bytes()


def test_benchmark_json_describes_the_set(shards: Path, tmp_path: Path) -> None:
    build(shards, tmp_path / "b", "filtered", num=5, seed=2)
    info = read_benchmark_info(str(tmp_path / "b"))
    assert info["format"] == "spatext-benchmark" and info["format_version"] == 1
    assert (info["protocol"], info["seed"], info["num_requested"], info["num_samples"]) == ("filtered", 2, 5, 5)
    assert info["num_regions"] == 10 and info["eligible"] == 16
    assert info["source"]["rows"] == 20 and len(info["source"]["files"]) == 2
    assert info["source"]["metadata"]["segmenter"] == "annotations" and info["source"]["metadata_consistent"]
    lines = (tmp_path / "b" / "samples.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    assert set(record) == {"key", "prompt", "width", "height", "regions", "masks", "reference"}
    assert [json.loads(line)["key"] for line in lines] == sorted(json.loads(line)["key"] for line in lines)


def test_existing_output_needs_overwrite(shards: Path, tmp_path: Path) -> None:
    build(shards, tmp_path / "b", "all", num=3)
    with pytest.raises(ValueError, match="--overwrite"):
        build(shards, tmp_path / "b", "all", num=3)
    info, samples = build(shards, tmp_path / "b", "filtered", num=2, overwrite=True)
    assert len(samples) == 2 and len(list((tmp_path / "b" / "masks").iterdir())) == 2


def test_overwrite_replaces_only_a_benchmark_set(shards: Path, tmp_path: Path) -> None:
    """--overwrite removes make-benchmark's own entries only, and never the shards being read."""
    photos = tmp_path / "photos"
    (photos / "masks").mkdir(parents=True)
    (photos / "masks" / "holiday.jpg").write_bytes(b"not a mask")
    with pytest.raises(ValueError, match="--out.*masks.*refusing"):
        build(shards, photos, "all", num=2, overwrite=True)
    assert (photos / "masks" / "holiday.jpg").read_bytes() == b"not a mask"
    (photos / "benchmark.json").write_text('{"format": "my-own"}')
    with pytest.raises(ValueError, match="--out.*not a benchmark set.*refusing"):
        build(shards, photos, "all", num=2, overwrite=True)
    nested = tmp_path / "nested"
    write_shards(nested / "reference", range(3), parts=1)  # the shards lie in --out's reference/ folder
    (nested / "samples.jsonl").write_text("")
    with pytest.raises(ValueError, match="--shards"):
        build(nested / "reference", nested, "all", overwrite=True)
    assert (nested / "reference" / "shards" / "part-00000.parquet").is_file()


def test_fingerprint_ignores_timings_and_follows_the_content(shards: Path, tmp_path: Path) -> None:
    """Identical rebuilds keep the fingerprint (benchmark.json's time fields differ); a changed sample changes it."""
    build(shards, tmp_path / "a", "few", num=3, seed=4)
    build(shards, tmp_path / "b", "few", num=3, seed=4)
    info_path = tmp_path / "b" / "benchmark.json"
    info = json.loads(info_path.read_text())
    info.update(created="1999-01-01T00:00:00Z", wall_s=123.0, package_version="0.0.0")
    info_path.write_text(json.dumps(info))
    first = benchmark_fingerprint(str(tmp_path / "a"))
    assert len(first) == 64 and benchmark_fingerprint(str(tmp_path / "b")) == first
    build(shards, tmp_path / "a", "few", num=3, seed=4, overwrite=True)
    assert benchmark_fingerprint(str(tmp_path / "a")) == first
    records = [json.loads(line) for line in (tmp_path / "b" / "samples.jsonl").read_text().splitlines()]
    records[0]["regions"][0]["prompt"] = "zebra"
    (tmp_path / "b" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert benchmark_fingerprint(str(tmp_path / "b")) != first
    mask = tmp_path / "a" / records[1]["masks"]
    mask.write_bytes(mask.read_bytes() + b"\0")  # a changed mask file
    assert benchmark_fingerprint(str(tmp_path / "a")) != first
    build(shards, tmp_path / "c", "few", num=3, seed=5)
    assert benchmark_fingerprint(str(tmp_path / "c")) != first


def test_spec_and_input_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--protocol.*all, filtered, few"):
        BenchmarkSpec(shards="x", out="y", protocol="some")
    with pytest.raises(ValueError, match="--num"):
        BenchmarkSpec(shards="x", out="y", num=0)
    with pytest.raises(ValueError, match="--shards.*no shards"):
        make_benchmark(BenchmarkSpec(shards=str(tmp_path), out=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="benchmark.json is missing"):
        load_benchmark(str(tmp_path))


def test_parquet_files_that_are_not_shards_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A Parquet file without the shard columns, or not Parquet at all: an error naming the file and what it holds
    (exit status 2 from the CLI), not a KeyError traceback."""
    folder = tmp_path / "other"
    folder.mkdir()
    pq.write_table(pa.table({"key": ["a"], "url": ["x"]}), folder / "a.parquet")
    with pytest.raises(ValueError, match=r"a\.parquet' is not a spatext shard.*lacks .*'image'.*'segments'.*its "
                       r"columns: key, url"):
        make_benchmark(BenchmarkSpec(shards=str(folder), out=str(tmp_path / "o")))
    (folder / "a.parquet").write_bytes(b"junk!!")
    assert cli.main(["make-benchmark", "--shards", str(folder), "--out", str(tmp_path / "o")]) == 2
    assert "a.parquet' is not a readable Parquet file" in capsys.readouterr().err


def test_file_stem() -> None:
    assert file_stem("demo-000001") == "demo-000001"
    odd = file_stem("../a b/c")
    assert "/" not in odd and odd.startswith("a_b_c-") and odd != file_stem("../a b/d")


def test_cli_on_the_demo_shards(demo_shards, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench"
    argv = ["make-benchmark", "--shards", str(demo_shards), "--protocol", "few", "--num", "5", "--seed", "3",
            "--out", str(out)]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip().startswith("benchmark few: 5 samples")
    samples = load_benchmark(str(out))
    assert len(samples) == 5 and all(1 <= len(s.regions) <= 3 for s in samples)
    assert read_benchmark_info(str(out))["source"]["metadata"]["clip_model"] == "spatext-tiny"
    assert cli.main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["make-benchmark", "--shards", str(demo_shards), "--protocol", "most", "--out", str(out)])


def test_cli_mask_perturb_argument() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_mask_perturb_argument(parser)
    assert str(parser.parse_args(["--mask-perturb", "dilate:4"]).mask_perturb) == "dilate:4"
    assert parser.parse_args([]).mask_perturb is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--mask-perturb", "grow:4"])
