"""`spatext eval score`: bootstrap intervals, mask sensitivity, and the report files end to end (tiny random models)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from spatext.eval import cli
from spatext.eval.benchmark_set import BenchmarkSpec, load_benchmark, make_benchmark
from spatext.eval.masks import parse_perturb
from spatext.eval.report import PUBLISHED_NOTE
from spatext.eval.score import bootstrap_interval, perturbed_inputs
from spatext.model.tiny_base import write_tiny_base_model

TINY = ["--clip-model", "spatext-tiny", "--clip-pretrained", "none", "--fid-extractor", "clip", "--bootstrap", "200"]
# A random tiny Mask2Former finds segments only with every threshold at 0 (DESIGN.md, "Weights").
MASK2FORMER = ["--segmenter", "mask2former", "--segmenter-weights", "none", "--segmenter-config", "mask2former-tiny",
               "--segmenter-threshold", "0", "--segmenter-mask-threshold", "0", "--segmenter-overlap-threshold", "0",
               "--segmenter-size", "64"]
METHODS = ("reference", "global-only", "concat", "ntlb")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def generations(demo_shards, tmp_path_factory) -> tuple[Path, list[Path]]:
    """A 4-sample `filtered` benchmark and a generations folder per method (tiny random base model, 2 steps)."""
    root = tmp_path_factory.mktemp("score")
    bench = root / "bench"
    make_benchmark(BenchmarkSpec(shards=str(demo_shards), out=str(bench), protocol="filtered", num=4, seed=0))
    base = write_tiny_base_model(str(root / "tiny-sd"))
    folders = []
    for method in METHODS:
        folders.append(root / method)
        argv = ["generate", "--benchmark", str(bench), "--method", method, "--out", str(folders[-1])]
        if method != "reference":
            argv += ["--base-model", base, "--steps", "2", "--ntlb-steps", "1", "--weights-label", "none (random init)"]
        assert cli.main(argv) == 0
    return bench, folders


def test_bootstrap_interval_pools_pairs_and_resamples_samples() -> None:
    groups = [np.array([0.0, 1.0]), np.array([1.0]), np.array([0.5, 0.5, 0.5])]
    summary = bootstrap_interval(groups, 1000, seed=0)
    assert summary["mean"] == pytest.approx(3.5 / 6) and summary["n_pairs"] == 6 and summary["n_samples"] == 3
    assert summary["ci_low"] <= summary["mean"] <= summary["ci_high"] and summary["ci_low"] < summary["ci_high"]
    assert bootstrap_interval(groups, 1000, seed=0) == summary
    flat = bootstrap_interval([np.array([0.25])] * 5, 100, seed=1)
    assert flat["ci_low"] == flat["ci_high"] == flat["mean"] == 0.25
    assert bootstrap_interval([np.zeros(0)], 10, seed=0)["mean"] is None


def test_perturbed_inputs_renumber_and_count_vanished_regions(generations) -> None:
    samples = load_benchmark(str(generations[0]))
    masks, prompts, vanished = perturbed_inputs(samples, parse_perturb("erode:1000"))
    assert vanished == sum(len(s.regions) for s in samples) - sum(len(p) for p in prompts)
    masks, prompts, vanished = perturbed_inputs(samples, parse_perturb("dilate:2"))
    assert vanished == 0 and [len(p) for p in prompts] == [len(s.regions) for s in samples]
    for index_map, sample in zip(masks, samples, strict=True):
        assert (index_map[sample.masks > 0] == sample.masks[sample.masks > 0]).all()
        assert (index_map > 0).sum() >= (sample.masks > 0).sum()


def _finite(value: object) -> bool:
    """True when every number in a JSON value is finite."""
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def test_score_report_with_annotations(generations, tmp_path) -> None:
    bench, folders = generations
    out = tmp_path / "report"
    argv = ["score", "--benchmark", str(bench), "--generations", *map(str, folders), "--out", str(out), *TINY]
    assert cli.main(argv) == 0
    for name in ("report.md", "report.json", "report.csv", "grid.png", "bars_fid.png", "bars_local_iou.png"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    assert _finite(report) and report["random_weights"] == ["clip", *(f"generations {m}" for m in METHODS[1:])]
    rows = {row["label"]: row for row in report["methods"]}
    assert list(rows) == list(METHODS)
    # annotations = the reference image's own segments: IoU exactly 1; other methods have no ground truth.
    assert rows["reference"]["metrics"]["local_iou"]["mean"] == 1.0
    assert all(rows[m]["metrics"]["local_iou"] is None for m in METHODS[1:])
    for row in rows.values():
        assert row["num_images"] == 4 and row["fid"]["num_real"] == row["fid"]["num_generated"] == 4
        for name in ("global_distance", "local_distance"):
            summary = row["metrics"][name]
            assert summary["ci_low"] <= summary["mean"] <= summary["ci_high"]
    assert rows["reference"]["fid"]["fid"] == pytest.approx(0.0, abs=1e-3)  # the same images on both sides
    with open(out / "report.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["method"] for r in table if r["kind"] == "measured"] == list(METHODS)
    published = [r for r in table if r["kind"] == PUBLISHED_NOTE]
    assert [(r["protocol"], float(r["fid"])) for r in published] == [("all", 19.8), ("filtered", 18.9), ("few", 16.2)]
    text = (out / "report.md").read_text()
    assert text.count(PUBLISHED_NOTE) >= 3 and "not directly comparable" in text and "random weights" in text


def test_score_with_a_segmenter_and_mask_perturbation(generations, tmp_path) -> None:
    bench, folders = generations
    out = tmp_path / "report"
    argv = ["score", "--benchmark", str(bench), "--generations", *map(str, folders[:2]), "--out", str(out), *TINY,
            *MASK2FORMER, "--mask-perturb", "erode:2"]
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["random_weights"]) == {"clip", "segmenter", "generations global-only"}
    for row in report["methods"]:
        iou = row["metrics"]["local_iou"]
        assert 0.0 <= iou["ci_low"] <= iou["mean"] <= iou["ci_high"] <= 1.0
        sensitivity = row["mask_sensitivity"]
        for name in ("local_distance", "local_iou"):
            delta = sensitivity[name]["delta"]
            assert math.isfinite(delta)
            assert delta == pytest.approx(sensitivity[name]["perturbed"]["mean"] - row["metrics"][name]["mean"])
    assert "Mask sensitivity (erode:2)" in (out / "report.md").read_text()


def test_score_refuses_generations_of_another_benchmark(generations, demo_shards, tmp_path) -> None:
    bench, folders = generations
    other = tmp_path / "other"
    make_benchmark(BenchmarkSpec(shards=str(demo_shards), out=str(other), protocol="few", num=2, seed=1))
    argv = ["score", "--benchmark", str(other), "--generations", str(folders[0]), "--out", str(tmp_path / "r"), *TINY]
    assert cli.main(argv) == 2
