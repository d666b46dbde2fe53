"""`spatext eval score`: bootstrap intervals, mask sensitivity, and the report files end to end (tiny random models)."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from spatext.eval import cli, report, score
from spatext.eval.benchmark_set import BenchmarkSpec, benchmark_fingerprint, load_benchmark, make_benchmark
from spatext.eval.generate import _run_label, base_weights_label, provenance_unknown
from spatext.eval.masks import parse_perturb
from spatext.eval.report import PUBLISHED_NOTE, bar_chart, error_bars, random_weights_note, weights_lines, write_report
from spatext.eval.score import ScoreSpec, bootstrap_interval, check_generations, perturbed_inputs
from spatext.model.tiny_base import write_tiny_base_model
from spatext.pipeline.clip import TINY_MODEL
from spatext.pipeline.weights import file_sha256

TINY = ["--clip-model", "spatext-tiny", "--clip-pretrained", "none", "--fid-extractor", "clip", "--bootstrap", "200"]
# A random tiny Mask2Former finds segments only with every threshold at 0 (DESIGN.md, "Weights").
MASK2FORMER = ["--segmenter", "mask2former", "--segmenter-weights", "none", "--segmenter-config", "mask2former-tiny",
               "--segmenter-threshold", "0", "--segmenter-mask-threshold", "0", "--segmenter-overlap-threshold", "0",
               "--segmenter-size", "64"]
METHODS = ("reference", "global-only", "concat", "ntlb")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def generations(demo_shards, tmp_path_factory) -> tuple[Path, list[Path]]:
    """A 4-sample `filtered` benchmark and a generations folder per method (tiny random base model, 2 steps).

    No --weights-label: the random weights are labelled by the tiny base model's own marker file.
    """
    root = tmp_path_factory.mktemp("score")
    bench = root / "bench"
    make_benchmark(BenchmarkSpec(shards=str(demo_shards), out=str(bench), protocol="filtered", num=4, seed=0))
    base = write_tiny_base_model(str(root / "tiny-sd"))
    folders = []
    for method in METHODS:
        folders.append(root / method)
        argv = ["generate", "--benchmark", str(bench), "--method", method, "--out", str(folders[-1])]
        if method != "reference":
            argv += ["--base-model", base, "--steps", "2", "--ntlb-steps", "1"]
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
    weights = {r["method"]: r["random_weights"] for r in table if r["kind"] == "measured"}  # the CSV alone says so
    assert weights == {"reference": "clip", **{m: f"clip;generations {m}" for m in METHODS[1:]}}
    assert all(r["unknown_provenance"] == "" for r in table)
    published = [r for r in table if r["kind"] == PUBLISHED_NOTE]
    assert [(r["protocol"], float(r["fid"])) for r in published] == [("all", 19.8), ("filtered", 18.9), ("few", 16.2)]
    fid_name = f"FID on CLIP {TINY_MODEL} features"  # --fid-extractor clip: never plain "FID"
    assert all(r["fid_name"] == fid_name and r["fid_comparable"] == "False" for r in table if r["kind"] == "measured")
    text = (out / "report.md").read_text()
    assert f"| images | {fid_name} |" in text and "| Inception FID 19.8 |" in text
    assert f"**{fid_name} is not comparable with published FIDs**" in text
    assert text.count(PUBLISHED_NOTE) >= 3 and "not directly comparable" in text and "random weights" in text
    assert "generations concat" in text and "generations ntlb" in text  # the tiny base model's marker, end to end
    assert "generations ntlb" in random_weights_note(report)  # the note the charts and the grid carry
    dim, images = rows["reference"]["fid"]["feature_dim"], rows["reference"]["fid"]["num_generated"]
    assert images < dim and f"FID warning: {', '.join(METHODS)}: fewer images than feature dimensions ({images} < " \
        f"{dim})" in text  # a few demo images against 32+ dimensions


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


def test_bootstrap_zero_means_no_interval_and_small_counts_are_refused(generations) -> None:
    groups = [np.array([0.0, 1.0]), np.array([1.0])]
    summary = bootstrap_interval(groups, 0, seed=0)
    assert summary["mean"] == pytest.approx(2 / 3) and summary["ci_low"] is None and summary["ci_high"] is None
    bench, folders = generations
    for resamples in (1, 99, -1):
        with pytest.raises(ValueError, match="--bootstrap must be 0 .* or >= 100"):
            ScoreSpec(benchmark=str(bench), generations=(str(folders[0]),), out="r", bootstrap=resamples)
    assert ScoreSpec(benchmark=str(bench), generations=(str(folders[0]),), out="r", bootstrap=0).bootstrap == 0
    for rows in (0, -2):  # -2 used to show all but the last two samples; 0 failed in matplotlib after scoring
        with pytest.raises(ValueError, match=f"--grid-samples must be >= 1 \\(rows of the image grid\\), got {rows}"):
            ScoreSpec(benchmark=str(bench), generations=(str(folders[0]),), out="r", grid_samples=rows)


def test_error_bars_are_never_negative(tmp_path) -> None:
    """A percentile interval above the mean (few or skewed samples) used to crash matplotlib ('yerr' < 0)."""
    assert error_bars(0.5, 0.6, 0.7) == (0.0, pytest.approx(0.2))
    assert error_bars(0.5, 0.3, 0.4) == (pytest.approx(0.2), 0.0)
    assert error_bars(0.5, None, None) == (0.0, 0.0)
    above = {"mean": 0.5, "ci_low": 0.6, "ci_high": 0.7}  # the interval lies above the mean
    none = {"mean": 0.5, "ci_low": None, "ci_high": None}  # --bootstrap 0
    result = {"random_weights": ["clip"], "methods": [
        {"label": label, "fid": {"fid": None}, "metrics": {"global_distance": summary}}
        for label, summary in (("a", above), ("b", none))]}
    bar_chart(result, "global_distance", str(tmp_path / "bars.png"))
    assert (tmp_path / "bars.png").stat().st_size > 0


def test_report_files_are_replaced_all_or_none(generations, tmp_path, monkeypatch) -> None:
    """--bootstrap 0 end to end; then a failing chart leaves the previous report untouched (no mix, no staging)."""
    bench, folders = generations
    out = tmp_path / "report"
    argv = ["score", "--benchmark", str(bench), "--generations", str(folders[0]), "--out", str(out), *TINY,
            "--bootstrap", "0"]
    assert cli.main(argv) == 0
    result = json.loads((out / "report.json").read_text())
    assert result["methods"][0]["metrics"]["global_distance"]["ci_low"] is None
    assert "(no interval)" in (out / "report.md").read_text()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) >= {"report.md", "report.json", "report.csv", "grid.png", "bars_fid.png"}

    def broken(*args, **kwargs):
        raise RuntimeError("chart failed")

    monkeypatch.setattr(report, "image_grid", broken)
    result["settings"]["seed"] = 99
    with pytest.raises(RuntimeError, match="chart failed"):
        write_report(result, str(out), load_benchmark(str(bench)))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _copy_with_images(folder: Path, dest: Path, change) -> Path:
    """A copy of a generations folder whose generation.json image list was changed by ``change(images)``."""
    shutil.copytree(folder, dest)
    info = json.loads((dest / "generation.json").read_text())
    change(info["images"])
    (dest / "generation.json").write_text(json.dumps(info))
    return dest


def test_every_generations_folder_is_checked_before_scoring(generations, tmp_path, monkeypatch, capsys) -> None:
    """Missing and extra keys are named in one line for the folder, before any model loads."""
    bench, folders = generations
    fewer = _copy_with_images(folders[0], tmp_path / "fewer", lambda images: images.pop(sorted(images)[0]))
    extra = _copy_with_images(folders[0], tmp_path / "extra", lambda images: images.update(ghost="images/g.png"))

    def no_models(*args, **kwargs):
        raise AssertionError("models loaded before the generations folders were checked")

    monkeypatch.setattr(score, "Scorer", no_models)
    missing_key = sorted(s.key for s in load_benchmark(str(bench)))[0]
    for folder, expected in ((fewer, f"without an image: 1 of 4 ('{missing_key}')"),
                             (extra, "not in the benchmark: 1 ('ghost')")):
        argv = ["score", "--benchmark", str(bench), "--generations", str(folders[0]), str(folder), "--out",
                str(tmp_path / "r"), *TINY]
        assert cli.main(argv) == 2
        error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(error) == 1 and str(folder) in error[0] and expected in error[0]
    for out in (folders[0], folders[0] / "report", bench / "r"):  # inside: a later --overwrite would delete it
        argv = ["score", "--benchmark", str(bench), "--generations", str(folders[0]), "--out", str(out), *TINY]
        assert cli.main(argv) == 2 and "write the report to a folder of its own" in capsys.readouterr().err
        assert not (folders[0] / "report").exists()
    outside = _copy_with_images(folders[0], tmp_path / "outside",
                                lambda images: images.update({missing_key: f"../{folders[1].name}/x.png"}))
    argv = ["score", "--benchmark", str(bench), "--generations", str(outside), "--out", str(tmp_path / "r"), *TINY]
    assert cli.main(argv) == 2
    assert f"lists images outside the folder: 1 ('../{folders[1].name}/x.png')" in capsys.readouterr().err


def test_a_damaged_generated_image_is_named_before_scoring(generations, tmp_path, monkeypatch, capsys) -> None:
    """A truncated PNG passes a header read: its CRCs are checked with the folder, so the error names the file and
    the sample before any model loads; one damaged later still names them when read."""
    bench, folders = generations
    folder = tmp_path / "damaged"
    shutil.copytree(folders[0], folder)
    info = json.loads((folder / "generation.json").read_text())
    key, name = sorted(info["images"].items())[1]
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) * 2 // 3])
    monkeypatch.setattr(score, "Scorer", lambda *a, **k: pytest.fail("models loaded before the folders were checked"))
    argv = ["score", "--benchmark", str(bench), "--generations", str(folder), "--out", str(tmp_path / "r"), *TINY]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert f"{name} (sample {key!r}) is not a readable image" in error and str(folder) in error
    sample = next(s for s in load_benchmark(str(bench)) if s.key == key)
    with pytest.raises(ValueError, match=rf"{name}' \(sample {key!r}\) is not a readable image"):
        score._read_image(str(folder / name), sample)


def test_unlisted_image_files_are_named_in_a_warning(generations, tmp_path, caplog) -> None:
    bench, folders = generations
    folder = tmp_path / "copy"
    shutil.copytree(folders[0], folder)
    info = json.loads((folder / "generation.json").read_text())
    listed = sorted(info["images"].values())
    shutil.copy(folder / listed[0], folder / "images" / "stray.png")
    samples = load_benchmark(str(bench))
    with caplog.at_level(logging.WARNING, logger="spatext.eval.score"):
        check_generations(str(folder), str(bench), samples, benchmark_fingerprint(str(bench)))
    assert "1 image file(s) beside the listed ones are not in generation.json" in caplog.text
    assert "'images/stray.png'" in caplog.text
    assert score.unlisted_images(str(folders[0]), listed) == []


def test_generations_still_match_an_identically_rebuilt_benchmark(generations, demo_shards, tmp_path) -> None:
    bench, folders = generations
    rebuilt = tmp_path / "bench"
    make_benchmark(BenchmarkSpec(shards=str(demo_shards), out=str(rebuilt), protocol="filtered", num=4, seed=0))
    info = json.loads((rebuilt / "benchmark.json").read_text())
    (rebuilt / "benchmark.json").write_text(json.dumps({**info, "created": "2000-01-01T00:00:00Z", "wall_s": 9.0}))
    assert file_sha256(str(rebuilt / "benchmark.json")) != file_sha256(str(bench / "benchmark.json"))
    samples = load_benchmark(str(rebuilt))
    assert check_generations(str(folders[1]), str(rebuilt), samples, benchmark_fingerprint(str(rebuilt)))


def _one_error_line(err: str) -> str:
    """The single `spatext eval score: error: ...` line of stderr (and no traceback)."""
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


def test_missing_weights_offline_are_one_line_cli_errors(generations, tmp_path, monkeypatch, capsys) -> None:
    """Weights that cannot be downloaded (offline, nothing cached) give `error: ...` and exit status 2."""
    import open_clip

    bench, folders = generations
    base = ["score", "--benchmark", str(bench), "--generations", str(folders[0]), "--out", str(tmp_path / "r")]
    # cli.main's logging setup adds no handler when an earlier test left a root handler on its own (now closed)
    # captured stderr, whose write errors would print tracebacks here: start from no handler
    monkeypatch.setattr(logging.getLogger(), "handlers", [])

    def offline(*args, **kwargs):
        raise OSError("no network (HF_HUB_OFFLINE=1)")

    monkeypatch.setattr(open_clip, "download_pretrained", offline)  # as offline with an empty cache
    assert cli.main([*base, "--clip-model", "ViT-B-32", "--clip-pretrained", "openai", "--fid-extractor", "clip"]) == 2
    assert "--clip-pretrained 'openai'" in _one_error_line(capsys.readouterr().err)
    if importlib.util.find_spec("torch_fidelity") is None:
        pytest.skip("torch-fidelity is not installed: the default Inception extractor is not available")
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    monkeypatch.setattr(fe, "load_state_dict_from_url", offline)
    assert cli.main([*base, "--clip-model", "spatext-tiny", "--clip-pretrained", "none"]) == 2  # default inception
    assert "--inception-weights PATH" in _one_error_line(capsys.readouterr().err)


def test_rows_of_one_method_get_labels_that_tell_them_apart() -> None:
    rows = [{"label": "ntlb", "generations": "/g/ntlb"}, {"label": "ntlb", "generations": "/g/ntlb0/"},
            {"label": "concat", "generations": "/g/concat"}, {"label": "ntlb", "generations": "/h/ntlb"}]
    score.unique_labels(rows)
    assert [r["label"] for r in rows] == ["ntlb [ntlb] #1", "ntlb [ntlb0]", "concat", "ntlb [ntlb] #4"]


def test_bar_chart_draws_one_slot_per_row_and_no_bar_for_an_unmeasured_metric(tmp_path, monkeypatch) -> None:
    """Equal labels shared one x position (a bar hidden behind another); an unmeasured metric was a zero bar."""
    import matplotlib.axes

    drawn = {}
    real_bar = matplotlib.axes.Axes.bar

    def bar(self, x, height, *args, **kwargs):
        drawn["x"], drawn["height"] = list(x), list(height)
        return real_bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    methods = [{"label": label, "fid": {}, "metrics": {"local_iou": summary}}
               for label, summary in (("a", {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6}), ("a", None),
                                      ("b", {"mean": 0.25, "ci_low": None, "ci_high": None}))]
    bar_chart({"methods": methods, "random_weights": []}, "local_iou", str(tmp_path / "bars.png"))
    assert drawn == {"x": [0, 2], "height": [0.5, 0.25]} and (tmp_path / "bars.png").is_file()


def test_a_bar_chart_of_one_method_shows_its_whole_title_and_note(tmp_path, monkeypatch) -> None:
    """One method made a 3.2-inch figure whose title was cut at the edge; the title and the weights note now wrap
    inside the figure."""
    figures = []
    close = report.plt.close
    monkeypatch.setattr(report.plt, "close", lambda fig: figures.append(fig))
    result = {"methods": [{"label": "concat", "fid": {"fid": 1.5}, "metrics": {}}],
              "fid": {"name": "FID on CLIP spatext-tiny features, an extractor with a long name"},
              "random_weights": ["clip", "segmenter", "generations concat", "generations a-long-method-label"]}
    bar_chart(result, "fid", str(tmp_path / "bars.png"))
    fig = figures[0]
    fig.canvas.draw()
    renderer, width = fig.canvas.get_renderer(), fig.bbox.width
    texts = [fig.axes[0].title, *fig.texts]
    assert len(texts) == 2 and fig.axes[0].title.get_text().startswith("FID on CLIP spatext-tiny")
    for text in texts:
        box = text.get_window_extent(renderer)
        assert 0 <= box.x0 and box.x1 <= width, (text.get_text(), box, width)
    close(fig)


def test_the_grid_caption_of_a_scene_fits_three_lines() -> None:
    from spatext.eval.benchmark_set import BenchmarkRegion, BenchmarkSample

    regions = tuple(BenchmarkRegion(i, "a very long local prompt about a striped umbrella" if i == 1 else f"r{i}",
                                    0.1) for i in range(1, 6))
    sample = BenchmarkSample("k", "p", regions, np.zeros((2, 2), np.uint8), np.zeros((2, 2, 3), np.uint8))
    assert report.region_lines(sample) == ["1: a very long local prompt about a s...", "2: r2", "+3 more"]  # 40 wide
    assert report.region_lines(sample.__class__("k", "p", regions[1:3], sample.masks, sample.reference)) == [
        "2: r2", "3: r3"]


def test_the_grid_reads_images_where_generation_json_puts_them(generations, tmp_path, monkeypatch) -> None:
    """The grid rebuilt each path as images/KEY.png: a folder mapping its images elsewhere failed after scoring."""
    bench, folders = generations
    moved = tmp_path / "moved"
    shutil.copytree(folders[0], moved)
    info = json.loads((moved / "generation.json").read_text())
    (moved / "pictures").mkdir()
    for key, path in info["images"].items():
        (moved / path).rename(moved / "pictures" / f"{key}.png")
        info["images"][key] = f"pictures/{key}.png"
    (moved / "generation.json").write_text(json.dumps(info))
    from PIL import Image

    samples = load_benchmark(str(bench))
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    report.image_grid({"methods": [{"label": "m", "generations": str(moved)}], "random_weights": []}, samples, 2,
                      str(tmp_path / "grid.png"))
    assert [p for p in opened if p.startswith(str(moved))] == [
        str(moved / "pictures" / f"{s.key}.png") for s in samples[:2]]
    assert (tmp_path / "grid.png").is_file()


def test_weights_of_unknown_provenance_are_warned_like_random_ones(tmp_path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    label, _ = base_weights_label(str(plain), None)
    assert provenance_unknown(label) and provenance_unknown(_run_label(str(plain))["weights"])
    assert not provenance_unknown("trained") and not provenance_unknown("none (random init)")
    result = {"random_weights": ["clip"], "unknown_provenance": ["generations concat"],
              "fid": {"name": "FID", "comparable": True, "extractor": "inception-v3", "weights": "w"}}
    note = random_weights_note(result)
    assert note.startswith("random weights: clip")
    assert note.endswith("weights of unknown provenance: generations concat")
    lines = weights_lines(result)
    assert len(lines) == 2 and "**weights of unknown provenance**: generations concat" in lines[1]
    assert random_weights_note({"random_weights": [], "unknown_provenance": []}) is None


def test_tiny_fids_keep_their_size_and_sign_in_the_table() -> None:
    assert [report.fid_text(v) for v in (None, 0.0, 12.34567, -1.2e-13, 3.4e-5)] == [
        "n/a", "0.0000", "12.3457", "-1.2e-13", "3.4e-05"]


def test_the_report_colours_regions_as_inspect_and_sample_do():
    from spatext.eval.benchmark_set import BenchmarkRegion, BenchmarkSample
    from spatext.eval.report import scene_image
    from spatext.model.sample import draw_scene
    from spatext.model.scene import Scene
    from spatext.pipeline.palette import region_colour

    masks = np.zeros((8, 8), dtype=np.uint8)
    masks[:4], masks[4:, :4] = 1, 2
    regions = (BenchmarkRegion(1, "a", 0.5), BenchmarkRegion(2, "b", 0.25))
    image = scene_image(BenchmarkSample("k", "p", regions, masks, np.zeros((8, 8, 3), np.uint8)))
    drawn = np.asarray(draw_scene(Scene("p", [((masks == i).astype(np.uint8) * 255, f"r{i}") for i in (1, 2)]),
                                  (8, 8), legend=False).convert("RGB"))
    for pixel, index in (((0, 0), 1), ((7, 0), 2)):
        assert tuple(image[pixel]) == tuple(drawn[pixel]) == region_colour(index)
    assert tuple(image[7, 7]) == (0, 0, 0)
