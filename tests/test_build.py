"""The main job end to end on the demo corpus: counts, rejects, determinism across runners, verify, inspect."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import assert_same_rows, jpeg_bytes, read_rows, write_tar
from spatext.pipeline import build, verify
from spatext.pipeline.clip import ClipSpec, embed_images, embed_texts, load_clip
from spatext.pipeline.config import BuildConfig
from spatext.pipeline.crop import segment_crop
from spatext.pipeline.demo_corpus import write_corpus
from spatext.pipeline.inspect_shards import caption_lines, inspect_build
from spatext.pipeline.panoptic import encode_id_map
from spatext.pipeline.schema import read_metadata, row_to_sample
from spatext.pipeline.segmenters.annotations import AnnotationSegmenter
from spatext.pipeline.write import list_parquet

NUM = 10
TINY_CLIP = ["--clip-model", "spatext-tiny", "--clip-pretrained", "none"]


BAD_INPUTS = 6


def _bad_inputs_tar(path: str) -> str:
    """Six inputs that must each become a reject with a known reason. The last two would be good samples but for
    text UTF-8 cannot encode: a member name that is not UTF-8 (tarfile reads it with surrogates) and a caption
    with a lone surrogate escape in its JSON; each once failed the whole job or its model batch."""
    ann = {"segments_info": [{"id": 1, "category": "speck"}]}
    tiny_map = np.zeros((48, 64), np.int32)
    tiny_map[:3, :3] = 1  # 0.3% of the image: below the 5% threshold
    big_map = np.zeros((48, 64), np.int32)
    big_map[10:40, 10:50] = 1
    big = {"segments_info": [{"id": 1, "category": "thing"}]}
    latin1 = "caf\udce9"  # the name b"caf\xe9" as tarfile reads it (surrogateescape)
    return write_tar(path, [
        ("bad-image.jpg", b"definitely not a jpeg"), ("bad-image.txt", b"a caption"),
        ("no-caption.jpg", jpeg_bytes()),
        ("no-image.txt", b"only a caption"),
        ("tiny.jpg", jpeg_bytes()), ("tiny.txt", b"tiny things"), ("tiny.json", json.dumps(ann).encode()),
        ("tiny.panoptic.png", encode_id_map(tiny_map)),
        (f"{latin1}.jpg", jpeg_bytes()), (f"{latin1}.txt", b"a cafe"), (f"{latin1}.json", json.dumps(big).encode()),
        (f"{latin1}.panoptic.png", encode_id_map(big_map)),
        ("surrogate.jpg", jpeg_bytes()), ("surrogate.json", b'{"caption": "bad \\ud800 text", "segments_info": '
                                                         b'[{"id": 1, "category": "thing"}]}'),
        ("surrogate.panoptic.png", encode_id_map(big_map)),
    ])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(str(root / "wds"), NUM, seed=3, fmt="webdataset", samples_per_shard=4)
    _bad_inputs_tar(str(root / "wds" / "shard-bad.tar"))
    write_corpus(str(root / "folder"), NUM, seed=3, fmt="folder")
    return root


def _build(corpus, out, *extra):
    return build.run(["--input", str(corpus / "wds" / "*.tar"), "--output", str(out), "--image-format", "png",
                      "--segmenter", "auto", *TINY_CLIP, *extra])


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    manifest = _build(corpus, out)
    return out, manifest


def test_counts_and_reject_reasons(built):
    out, manifest = built
    counts = manifest["counts"]
    assert counts["read"] == NUM + BAD_INPUTS
    assert counts["accepted"] == NUM
    assert counts["rejected_by_reason"] == {
        "decode/unreadable_image": 1, "decode/missing_caption": 1, "decode/missing_image": 1,
        "select/no_segment_above_threshold": 1, "read/bad_name_encoding": 1, "read/bad_caption_encoding": 1,
    }
    rejects = pa.concat_tables([pq.read_table(p) for p in list_parquet(str(out), "rejects")]).to_pylist()
    assert {(r["key"], r["stage"], r["reason"].split(":")[0]) for r in rejects} == {
        ("bad-image", "decode", "unreadable_image"), ("no-caption", "decode", "missing_caption"),
        ("no-image", "decode", "missing_image"), ("tiny", "select", "no_segment_above_threshold"),
        ("caf\\udce9", "read", "bad_name_encoding"), ("surrogate", "read", "bad_caption_encoding"),
    }  # the non-UTF-8 name's reject is keyed by its backslash-escaped form, which Parquet can hold
    assert manifest["config"]["clip_model"] == "spatext-tiny" and manifest["wall_time_s"] > 0


def test_shards_are_valid_and_labelled(built):
    out, _ = built
    report = verify.verify_build(str(out), progress=False)
    assert report.ok, report.format()
    assert report.rows == NUM and report.rejects == BAD_INPUTS
    meta = read_metadata(pq.read_schema(list_parquet(str(out))[0]))
    assert meta["clip_pretrained"] == "none (random init)"
    assert meta["segmenter"] == "annotations" and meta["segmenter_weights"] == "ground truth"
    assert meta["embed_dim"] == "64" and meta["min_area"] == "0.05"
    assert pq.ParquetFile(list_parquet(str(out))[0]).metadata.row_group(0).column(0).compression == "ZSTD"


def test_rows_match_ground_truth_and_clip(built, corpus):
    """Labels come from the corpus ground truth; stored embeddings equal open_clip on the stored pixels."""
    out, _ = built
    rows = read_rows(out)
    assert [r["key"] for r in rows] == [f"demo-{i:06d}" for i in range(NUM)]
    truth = json.loads((corpus / "folder" / "panoptic" / "demo-000000.json").read_text())
    categories = {s["category"] for s in truth["segments_info"]}
    sample = row_to_sample(rows[0])
    assert {s["label"] for s in sample.segments} <= categories
    assert sample.caption == truth["caption"]
    clip = load_clip(ClipSpec(model="spatext-tiny", pretrained="none"))  # random init is seeded identically below
    crops = [segment_crop(sample.image, sample.segment_map == s["index"]) for s in sample.segments]
    expected = embed_images(clip, crops + [Image.fromarray(sample.image)])
    for seg, vector in zip(sample.segments, expected, strict=False):
        np.testing.assert_allclose(seg["embedding"], vector, atol=2e-3)
    np.testing.assert_allclose(sample.image_embedding, expected[-1], atol=2e-3)
    np.testing.assert_allclose(sample.caption_embedding, embed_texts(clip, [sample.caption])[0], atol=2e-3)


def test_folder_format_gives_the_same_samples(built, corpus, tmp_path):
    out, _ = built
    folder_out = tmp_path / "folder"
    manifest = build.run(["--input", str(corpus / "folder"), "--output", str(folder_out), "--image-format", "png",
                          *TINY_CLIP])
    assert manifest["counts"]["accepted"] == NUM and manifest["counts"]["rejected"] == 0
    # The same corpus in two formats: the same JPEG bytes, so the same pixels and the same rows.
    assert_same_rows(read_rows(folder_out), read_rows(out))


def test_a_segmenter_of_your_own_by_import_path(built, corpus, tmp_path):
    out, _ = built
    plugin = "spatext.pipeline.segmenters.annotations:AnnotationSegmenter"  # the built-in, named by its import path
    manifest = _build(corpus, tmp_path / "plugin", "--segmenter", plugin)
    assert manifest["counts"]["accepted"] == NUM
    assert_same_rows(read_rows(tmp_path / "plugin"), read_rows(out))
    assert read_metadata(pq.read_schema(list_parquet(str(tmp_path / "plugin"))[0]))["segmenter"] == plugin
    with pytest.raises(ValueError, match="cannot import"):
        _build(corpus, tmp_path / "bad", "--segmenter", "no_such_module_xyz:Segmenter")


class PoisonSegmenter(AnnotationSegmenter):
    """Test plugin: the ground truth, but a call holding demo-000003 raises, naming the keys it fails on."""

    def segment(self, samples):
        if any(s.key == "demo-000003" for s in samples):
            raise RuntimeError(f"cannot segment {[s.key for s in samples if s.key == 'demo-000003']}")
        return super().segment(samples)


def test_a_sample_the_segmenter_cannot_take_fails_alone(built, corpus, tmp_path):
    """Batched with good samples (batches of up to 4), one bad sample is the only reject, with its own error."""
    config, beam_args = build.parse_args([
        "--input", str(corpus / "wds" / "*.tar"), "--output", str(tmp_path / "poison"), "--image-format", "png",
        *TINY_CLIP, "--segmenter", "test_build:PoisonSegmenter", "--segmenter-batch-size", "4"])
    result, manifest = build.execute(config, beam_args)
    assert build.retried_batches(result) == 1  # 11 samples in calls of 4, 4, 3: the poisoned one shared a call
    counts = manifest["counts"]
    assert counts["accepted"] == NUM - 1 and counts["read"] == NUM + BAD_INPUTS
    assert counts["rejected_by_reason"]["segment/segmenter_error"] == 1
    rejects = pa.concat_tables([pq.read_table(p) for p in list_parquet(str(tmp_path / "poison"), "rejects")])
    (poisoned,) = [r for r in rejects.to_pylist() if r["stage"] == "segment"]
    assert poisoned["key"] == "demo-000003" and poisoned["reason"].endswith("cannot segment ['demo-000003']\")")
    good = [r for r in read_rows(built[0]) if r["key"] != "demo-000003"]
    assert_same_rows(read_rows(tmp_path / "poison"), good)


def test_model_calls_take_full_batches(corpus, tmp_path, monkeypatch):
    """The batch-size flags set the samples per model call (not a ceiling Beam's adaptive sizing grows towards from
    one sample: that left a 128-sample demo build's CLIP calls at 7.5 samples of 64)."""
    config, beam_args = build.parse_args([
        "--input", str(corpus / "wds" / "*.tar"), "--output", str(tmp_path / "b"), "--image-format", "png",
        "--segmenter", "auto", *TINY_CLIP, "--segmenter-batch-size", "4", "--clip-batch-size", "10"])
    segment = AnnotationSegmenter.segment

    def slow_segment(self, samples):  # each segment call takes at least 0.1 s
        time.sleep(0.1)
        return segment(self, samples)

    monkeypatch.setattr(AnnotationSegmenter, "segment", slow_segment)
    started = time.perf_counter()
    result, manifest = build.execute(config, beam_args)
    wall = time.perf_counter() - started
    sizes = build.mean_batch_sizes(result)
    assert manifest["counts"]["accepted"] == NUM  # 11 samples reach the segmenter ('tiny' is rejected after it)
    assert sizes == {"segment": pytest.approx(11 / 3), "embed": 10.0}  # calls of 4, 4, 3; one call of 10
    calls = build.model_calls(result)
    assert {name: (stage["samples"], stage["calls"]) for name, stage in calls.items()} == {
        "segment": (11, 3), "embed": (10, 1)}
    assert 0.3 <= calls["segment"]["seconds"] < 1.5  # 3 calls of 0.1 s asleep, and the segmenter's own little work
    assert 0 < calls["embed"]["seconds"]
    assert calls["segment"]["seconds"] + calls["embed"]["seconds"] < wall  # one worker: calls take turns


def test_a_gpu_build_in_one_direct_worker_warns_that_the_device_would_idle(caplog):
    from apache_beam.options.pipeline_options import PipelineOptions

    gpu, cpu = BuildConfig(input="x", output="y", device="cuda"), BuildConfig(input="x", output="y")
    cases = [
        (gpu, ["--runner=DirectRunner"], True),
        (gpu, [], True),
        (gpu, ["--runner=DirectRunner", "--direct_num_workers=8", "--direct_running_mode=multi_processing"], False),
        (gpu, ["--runner=DataflowRunner"], False),
        (cpu, ["--runner=DirectRunner"], False),
    ]
    for config, args, warns in cases:
        caplog.clear()
        with caplog.at_level("WARNING", logger="spatext.pipeline.build"):
            assert build.warn_if_device_would_idle(config, PipelineOptions(args)) is warns
        assert ("--direct_num_workers=N" in caplog.text) is warns


def test_existing_output_needs_overwrite(built, corpus):
    out, _ = built
    with pytest.raises(FileExistsError, match="--overwrite"):
        _build(corpus, out)


def test_verify_catches_corruption(built, tmp_path):
    out, _ = built
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    path = list_parquet(str(bad))[0]
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[0]["segments"][0]["index"] = 9  # the map no longer matches the segment list
    rows[1]["image_embedding"] = [x * 2 for x in rows[1]["image_embedding"]]  # not unit-norm
    rows.append(dict(rows[2]))  # a duplicate key, and one row more than the manifest says
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    report = verify.verify_build(str(bad), progress=False)
    kinds = {message.split(":")[0] for _, _, message in report.violations}
    assert {"segment_count", "embedding_norm", "duplicate_key", "count_accepted", "count_read"} <= kinds
    assert verify.main([str(bad)]) == 1 and verify.main([str(out)]) == 0

    with open(path, "r+b") as handle:  # truncated file: reported, not a crash
        handle.truncate(100)
    assert any("unreadable_shard" in m for _, _, m in verify.verify_build(str(bad), progress=False).violations)


def test_inspect_draws_a_grid(built, tmp_path):
    out, _ = built
    png = inspect_build(str(out), str(tmp_path / "grid.png"), num=6, columns=3, tile=200)
    with Image.open(png) as im:
        assert im.size == (600, 24 + 2 * 270)
        assert len(set(np.asarray(im.convert("RGB")).reshape(-1, 3)[::97].tobytes())) > 50  # not blank


def test_inspect_captions_say_when_they_are_cut():
    long = " ".join(f"word{i}" for i in range(60))
    lines = caption_lines(long, 30).split("\n")
    assert len(lines) == 4 and lines[-1].endswith(" ...") and all(len(line) <= 30 for line in lines)
    assert caption_lines("a short caption", 30) == "a short caption"


def test_entry_points(built, capsys):
    """`spatext COMMAND` dispatches; `python -m spatext.pipeline.build` and the console script both run."""
    from spatext.cli import main

    assert main([]) == 0 and "build" in capsys.readouterr().out
    assert main(["nope"]) == 2
    out, _ = built
    helped = subprocess.run([sys.executable, "-m", "spatext.pipeline.build", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert "--segmenter-weights" in helped.stdout and "Beam" in helped.stdout
    console = os.path.join(os.path.dirname(sys.executable), "spatext")
    verified = subprocess.run([console, "verify", str(out)], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr[-3000:]
    assert verified.stdout.startswith("OK")
    assert "shard/s" not in verified.stderr  # no progress bar when stderr is not a terminal


@pytest.mark.slow
def test_verify_never_aborts_at_exit(built):
    """`spatext verify` used to abort after printing OK in ~1 of 16 runs (SIGABRT at interpreter exit: an Arrow pool
    thread freeing a Python-backed buffer; see spatext.pipeline.parquet_files). 40 runs: the old code passed this
    with probability ~0.08. ~45 s."""
    out, _ = built
    console = os.path.join(os.path.dirname(sys.executable), "spatext")
    codes = [subprocess.run([console, "verify", str(out)], capture_output=True, text=True).returncode
             for _ in range(40)]
    assert codes == [0] * 40


def test_build_with_mask2former(corpus, tmp_path):
    """The model path: a tiny random-init Mask2Former (all thresholds 0, since random weights score nothing above
    the defaults) segments the images; the shards say so."""
    out = tmp_path / "m2f"
    manifest = build.run([
        "--input", str(corpus / "wds" / "shard-0000[01].tar"), "--output", str(out), *TINY_CLIP,
        "--segmenter", "mask2former", "--segmenter-weights", "none", "--segmenter-config", "mask2former-tiny",
        "--segmenter-threshold", "0", "--segmenter-mask-threshold", "0", "--segmenter-overlap-threshold", "0",
        "--segmenter-processor-size", "128", "--min-area", "0.01",
    ])
    counts = manifest["counts"]
    assert counts["read"] == 8 and counts["accepted"] + counts["rejected"] == 8 and counts["accepted"] >= 4
    assert set(counts["rejected_by_reason"]) <= {"select/no_segment_above_threshold"}
    report = verify.verify_build(str(out), progress=False)
    assert report.ok, report.format()
    meta = read_metadata(pq.read_schema(list_parquet(str(out))[0]))
    assert meta["segmenter"] == "mask2former" and meta["segmenter_weights"] == "none (random init)"
    labels = {s["label"] for r in read_rows(out) for s in r["segments"]}
    assert labels <= {"person", "dog", "tree", "grass", "sky", "road"}  # the tiny config's id2label
