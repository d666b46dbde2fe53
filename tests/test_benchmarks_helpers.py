"""The benchmark scripts' own arithmetic: subset size, unreliable overlap rates, record names, Fréchet timing."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
from pathlib import Path

import pytest


@pytest.mark.parametrize(("total", "fraction", "expected"), [
    (2, 0.25, 1),  # 128 samples at 64 per tar: half is the nearest to a quarter
    (3, 0.25, 1), (8, 0.25, 2), (16, 0.25, 4), (16, 1 / 16, 1), (1, 0.25, 1), (2, 0.9, 1), (4, 0.5, 2),
])
def test_subset_tar_count_nearest_at_least_one_fewer_than_all(bench, total, fraction, expected) -> None:
    assert bench("corpus_subset").subset_tar_count(total, fraction) == expected


def test_corpus_subset_links_and_drops_stale_links(bench, tmp_path: Path) -> None:
    corpus_subset = bench("corpus_subset").corpus_subset
    for i in range(8):
        (tmp_path / f"shard-{i:05d}.tar").write_bytes(b"")
    pattern = corpus_subset(str(tmp_path), 0.25)
    folder = Path(pattern).parent
    assert sorted(p.name for p in folder.iterdir()) == ["shard-00000.tar", "shard-00001.tar"]
    for i in range(4, 8):  # a smaller corpus written to the same folder
        (tmp_path / f"shard-{i:05d}.tar").unlink()
    corpus_subset(str(tmp_path), 0.25)
    assert sorted(p.name for p in folder.iterdir()) == ["shard-00000.tar"]


def test_replicate_corpus_adds_renamed_copies_with_new_keys(bench, tmp_path: Path) -> None:
    import tarfile

    from spatext.pipeline.demo_corpus import write_corpus

    subset = bench("corpus_subset")
    write_corpus(str(tmp_path), 4, seed=0, fmt="webdataset", samples_per_shard=2)
    assert subset.replicate_corpus(str(tmp_path), 3) == 4
    tars = sorted(p.name for p in tmp_path.glob("shard-*.tar"))
    assert tars == ["shard-00000.tar", "shard-00001.tar", "shard-r1-00000.tar", "shard-r1-00001.tar",
                    "shard-r2-00000.tar", "shard-r2-00001.tar"]

    def members(name: str) -> dict[str, bytes]:
        with tarfile.open(tmp_path / name) as tar:
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}

    original = {name: data for name, data in members("shard-00001.tar").items() if name.endswith((".jpg", ".txt"))}
    assert sorted(original) == ["demo-000002.jpg", "demo-000002.txt", "demo-000003.jpg", "demo-000003.txt"]
    assert members("shard-r2-00001.tar") == {f"r2-{name}": data for name, data in original.items()}
    assert Path(subset.corpus_subset(str(tmp_path), 1 / 3)).parent.joinpath("shard-00000.tar").exists()
    assert subset.replicate_corpus(str(tmp_path), 2) == 2  # again: copies of the originals only, old copies gone
    assert sorted(p.name for p in tmp_path.glob("shard-*.tar")) == tars[:4]


def test_overlap_flags_rates_above_the_device_ceiling(bench, tmp_path: Path, monkeypatch) -> None:
    overlap = bench("pipeline_overlap")
    for i in range(16):
        (tmp_path / f"shard-{i:05d}.tar").write_bytes(b"")
    walls = iter([10.0, 10.5])  # subset, full: 96 more images in 0.5 s = 192 img/s against a 50 img/s device

    def fake_build(config, beam_args):
        images = 32 if "subset" in config.input else 128
        return next(walls), {"counts": {"read": images, "accepted": images}}

    monkeypatch.setattr(overlap, "timed_build", fake_build)
    args = argparse.Namespace(out=str(tmp_path / "out"), segmenter_batch=8, clip_batch=8, image_size=128,
                              ms_per_image=20.0)
    fast = overlap.measure(args, str(tmp_path), "in_process")
    assert fast["quarter_images"] == 32 and fast["vs_ceiling"] == pytest.approx(3.84)
    assert fast["vs_ceiling_reliable"] is False
    walls = iter([10.0, 14.0])  # 24 img/s: below the ceiling
    slow = overlap.measure(args, str(tmp_path), "in_process")
    assert slow["vs_ceiling_reliable"] is True
    row = overlap.summarise([fast, slow, slow])
    assert row["vs_ceiling_reliable"] is True and row["runs_unreliable"] == 1
    order = []

    def logged_build(config, beam_args):
        order.append("subset" if "subset" in config.input else "full")
        return fake_build(config, beam_args)

    monkeypatch.setattr(overlap, "timed_build", logged_build)
    walls = iter([14.0, 10.0])  # the full build runs first: its wall time comes first
    swapped = overlap.measure(args, str(tmp_path), "in_process", full_first=True)
    assert order == ["full", "subset"] and swapped["full_first"] is True
    assert swapped["marginal_img_s"] == slow["marginal_img_s"]  # the same two builds, in the other order
    undefined = {**slow, "marginal_img_s": float("nan"), "vs_ceiling_reliable": False}
    for runs in ([undefined, fast, slow], [fast, undefined, slow], [slow, fast, undefined]):  # NaN sorts last
        assert overlap.summarise(runs)["marginal_img_s"] == fast["marginal_img_s"]


def test_loader_record_name_depends_on_the_step(bench) -> None:
    loader = bench("loader")
    assert loader.record_name(0.0) == "loader.json"
    assert loader.record_name(60.0) == "loader_step60.json"


def test_frechet_timing_warms_up_once_then_times_each_repeat(bench) -> None:
    eval_throughput = bench("eval_throughput")
    calls = []
    value, times = eval_throughput._timed_calls(lambda: calls.append(1) or float(len(calls)), 3, "cpu")
    assert len(calls) == 4 and len(times) == 3 and value == 4.0


def test_calls_per_second_runs_every_call_on_the_threads(bench) -> None:
    shared_model = bench("shared_model")
    seen: list[str] = []
    rate = shared_model.calls_per_second(lambda: seen.append(threading.current_thread().name), threads=3, calls=7)
    assert len(seen) == 6 and len(set(seen)) == 3  # 7 // 3 calls on each of 3 threads
    assert rate > 0


def test_shared_model_table_has_every_model_and_thread_count(bench, tmp_path: Path) -> None:
    shared_model = bench("shared_model")
    assert shared_model.main(["--threads", "1,2", "--calls", "2", "--repeats", "1", "--image-size", "32",
                              "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "shared_model.json").read_text())["rows"]
    assert {(r["model"], r["threads"]) for r in rows} == {(m, n) for m in ("mask2former-tiny", "clip spatext-tiny")
                                                          for n in (1, 2)}
    assert all(r["free_calls_s"] > 0 and r["serial_calls_s"] > 0 for r in rows)


def test_sampling_table_without_flop_counts(bench, capsys) -> None:
    sampling = bench("sampling")
    times = {"plain": [1.0, 2.0, 1.0], "joint": [1.1, 2.1, 1.2], "joint-concat": [1.2, 2.4, 1.2]}
    result = sampling.summarize(times, {})  # --no-flops: nothing counted
    assert result["flop_ratio_to_plain"] == {}
    assert result["ratio_to_plain"]["joint"] == pytest.approx(1.2)  # median 1.2 over median 1.0
    assert result["paired_ratio_to_plain"]["joint"] == pytest.approx(1.1)  # median of 1.1, 1.05, 1.2
    assert result["min_ratio_to_plain"]["joint-concat"] == pytest.approx(1.2)  # best 1.2 over best 1.0
    sampling.print_table(result)
    rows = {line.split("|")[1].strip(): line.split("|")[7].strip() for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "mode" not in line}
    assert rows == {"plain": "-", "joint": "-", "joint-concat": "-"}
    counted = sampling.summarize(times, {"plain": 10, "joint": 12, "joint-concat": 15})
    sampling.print_table(counted)
    assert "| 1.2000 |" in capsys.readouterr().out


def test_sampling_reports_the_once_per_call_scene_work_apart(bench, capsys) -> None:
    sampling = bench("sampling")
    times = {"plain": [1.0, 2.0, 1.0], "joint": [1.1, 2.1, 1.2], "scene": [0.05, 0.01, 0.02]}
    result = sampling.summarize(times, {})
    assert set(result["median_s"]) == {"plain", "joint"}  # the scene work is no mode of its own
    assert result["scene_s"]["median"] == pytest.approx(0.02) and result["scene_s"]["min"] == pytest.approx(0.01)
    assert result["scene_share_of_plain"] == pytest.approx(0.02)
    sampling.print_table(result)
    assert "20.0 ms = 0.020 of a plain call" in capsys.readouterr().out


def test_records_write_nan_and_infinity_as_null(bench, tmp_path: Path) -> None:
    bench_record = bench("bench_record")
    path = bench_record.write_record(str(tmp_path), "r.json", {"a": float("nan"), "b": [1.5, float("inf")],
                                                               "c": {"d": (float("-inf"), 2)}, "e": "x"})
    assert json.loads(Path(path).read_text()) == {"a": None, "b": [1.5, None], "c": {"d": [None, 2]}, "e": "x"}
    assert "NaN" not in Path(path).read_text()


def test_build_modes_map_to_beam_args_and_model_servers(bench) -> None:
    build_mode = bench("bench_record").build_mode
    single = {"model_sharing": "process", "model_copies": None, "model_server": "thread"}
    assert build_mode("in_process") == ([], single)
    assert build_mode("threads:3") == (["--direct_num_workers=3", "--direct_running_mode=multi_threading"], single)
    assert build_mode("processes:8") == (["--direct_num_workers=8", "--direct_running_mode=multi_processing"],
                                         {"model_sharing": "machine", "model_copies": None, "model_server": "thread"})
    assert build_mode("processes:8:copies2")[1] == {"model_sharing": "machine", "model_copies": 2,
                                                    "model_server": "thread"}
    assert build_mode("processes:8:ownserver:copies3")[1] == {"model_sharing": "machine", "model_copies": 3,
                                                              "model_server": "process"}
    for bad in ("threads:2:copies2", "processes:8:copies0", "processes:8:2", "processes:", "gpu:1", "processes:8:",
                "threads:2:", "processes:8:copies2:copies3", "processes:8:ownserver:ownserver", "processes:8:copies",
                "processes:2:zzzzzz4", "processes:8:cpoies2"):
        with pytest.raises(ValueError, match="is none of"):
            build_mode(bad)


def test_segmenter_checks_compare_the_processors_part_of_a_grid_padded_input(bench) -> None:
    """At 512 px the device preprocessing pads on to a 128 px grid: the check compares the processor's part and
    requires the rest to be zero (it raised on the shape difference before)."""
    import numpy as np

    from spatext.pipeline.records import Sample
    from spatext.pipeline.segmenters import SegmenterSpec, create_segmenter

    segmenter = create_segmenter(SegmenterSpec("mask2former", weights="none", config="mask2former-tiny", threshold=0,
                                               mask_threshold=0, overlap_threshold=0, processor_size=512))
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    inputs, sizes = segmenter.preprocess([Sample("r", "s", "c", image)])
    assert tuple(inputs["pixel_values"].shape[-2:]) == (512, 768)  # the processor's 512 x 704, on to the grid
    checks = bench("pipeline_gpu").segmenter_checks(segmenter, segmenter.forward(inputs), sizes)
    assert checks["segmenter_check_pre_max_abs"] == 0.0 and checks["segmenter_check_pre_mask_equal"]
    assert checks["segmenter_check_pre_grid_padding_zero"] is True
    assert checks["segmenter_check_merge_same_maps"] == "1/1"


@pytest.mark.parametrize(("script", "argv", "message"), [
    ("pipeline_overlap", ["--modes", "in_process,bogus"], "--modes: build mode 'bogus' is none of"),
    ("pipeline_overlap", ["--modes", "processes:0"], "--modes: build mode 'processes:0'"),
    ("shared_model", ["--repeats", "0"], "--repeats, --batch and --image-size must be >= 1"),
    ("shared_model", ["--threads", "1,x"], "--threads: comma-separated integers"),
    ("shared_model", ["--threads", "1,3", "--calls", "4"], "--calls 4 must be a multiple of every --threads"),
    ("pipeline_overlap", ["--num-samples", "0"], "need --num-samples >= 16"),
    ("segmenter_shapes", ["--smoke", "--setups", "a=4:grid33"], "--setups: set-up 'a=4:grid33' is not LABEL"),
    ("segmenter_shapes", ["--smoke", "--setups", "a=4:fast"], "--setups: set-up 'a=4:fast' is not LABEL"),
    ("pipeline_gpu", ["--smoke", "--build-modes", "processes:2:copies"], "build mode 'processes:2:copies' is none"),
    ("pipeline_gpu", ["--smoke", "--segmenter-kept", "0"], "--segmenter-kept must be >= 1, got 0"),
    ("pipeline_overlap", ["--modes", "processes:2:copies2"], "one emulated device per model server"),
    ("loader", ["--repeats", "0"], "--repeats and --epochs must be >= 1"),
    ("loader", ["--epochs", "0"], "--repeats and --epochs must be >= 1"),
    ("loader", ["--threads", "0"], "--resolutions, --threads"),
    ("train_step", ["--steps", "0"], "--steps, --layers"),
    ("train_step", ["--threads", "-1"], "--warmup and --threads must be >= 0"),
    ("train_step", ["--widths", "32"], "--widths: 2 to 4 positive block widths"),
    ("sampling", ["--num-images", "0"], "--num-images, --steps and --repeats must be >= 1"),
    ("torch_threads", ["--threads", "auto", "0"], "--threads takes auto or whole numbers >= 1"),
    ("torch_threads", ["--workers", "0"], "need --num-samples >= 16, --workers >= 1"),
])
def test_benchmark_flags_are_usage_errors(bench, capsys, script, argv, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench(script).main([*argv, "--out", "unused"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_segmenter_shapes_profiles_a_shape_no_set_up_ran(bench, tmp_path) -> None:
    """The smoke run (tiny model, CPU): the profiled batch's pass shape is one the set-ups did not run, and each call
    names its top operators with their times."""
    shapes = bench("segmenter_shapes")
    assert shapes.main(["--smoke", "--out", str(tmp_path), "--images", "4", "--repeats", "1", "--setups", "a=4"]) == 0
    record = json.loads((tmp_path / "segmenter_shapes.json").read_text())
    profile = record["profile"]
    assert profile["images"] == 4 and profile["shape"][0] == 4
    assert profile["shape"][2:] != [128, 128]  # the demo images at 128 px: not square, and no set-up ran it
    for call in ("first", "again"):
        ops = profile[call]["top_cpu"]
        assert profile[call]["wall_s"] > 0 and len(ops) == 15
        assert any(op["name"] == "aten::addmm" for op in ops)
        assert all(op["self_cpu_ms"] >= 0 and op["calls"] >= 1 for op in ops)
        assert profile[call]["device_allocs"] is None  # counted on cuda only


def test_a_new_shape_batch_avoids_every_seen_shape(bench) -> None:
    import numpy as np

    from spatext.pipeline.records import Sample
    from spatext.pipeline.segmenters import SegmenterSpec, create_segmenter

    shapes = bench("segmenter_shapes")
    segmenter = create_segmenter(SegmenterSpec("mask2former", weights="none", config="mask2former-tiny",
                                               processor_size=64, device="cpu"))
    segmenter.min_pass_pixels = float("inf")
    samples = [Sample("k", "s", "c", np.zeros((64, 80, 3), np.uint8))]
    seen: set = set()
    for _ in range(3):
        batch, shape = shapes.new_shape_batch(segmenter, samples, 64, seen)
        assert shape not in seen
        assert tuple(segmenter.preprocess(batch)[0]["pixel_values"].shape) == shape
        seen.add(shape)


def test_threshold_keeping_keeps_the_asked_queries_per_image_as_the_merge_counts_them(bench) -> None:
    """The merge's own rule (``_kept_queries``: score above the threshold, class not "no object") is the reference."""
    from types import SimpleNamespace

    import torch

    from spatext.pipeline.segmenters.panoptic_merge import _kept_queries

    gpu = bench("pipeline_gpu")
    gen = torch.Generator().manual_seed(0)
    outputs = [SimpleNamespace(class_queries_logits=torch.randn(b, 50, 8, generator=gen) * 3) for b in (3, 5)]
    for per_image in (1, 7, 20):
        threshold = gpu.threshold_keeping(outputs, per_image)
        counted = sum(int(_kept_queries(o.class_queries_logits, threshold).counts.sum()) for o in outputs)
        assert counted == per_image * 8  # 8 images; random scores: no ties
        assert gpu.kept_per_image(outputs, threshold) == per_image
    assert gpu.threshold_keeping(outputs, 50) == 0.0  # fewer survive even at 0: keep them all
    assert gpu._rounded("segmenter_kept_threshold", 0.123456789) == 0.123456789  # the build reads it back exact


def test_loader_ratios_compare_equal_cores_and_the_faster_decoder(bench) -> None:
    """A loader variant on N cores is paired, repeat by repeat, with the faster bare decoder on N threads; the
    verdict needs every repeat at the goal."""
    loader = bench("loader")
    cores = os.cpu_count() or 1
    assert loader.variant_cores(0, 1) == 1 and loader.variant_cores(2, 1) == min(2, cores)
    assert loader.variant_cores(4, 4) == cores  # never more threads than the machine has
    runs = {("pil", 2): {"rate": [100.0, 90.0, 110.0], "cpu": [0.002] * 3},
            ("torchvision", 2): {"rate": [200.0, 150.0, 250.0], "cpu": [0.001] * 3},
            ("pil", 1): {"rate": [60.0] * 3, "cpu": [0.002] * 3},
            ("torchvision", 1): {"rate": [100.0] * 3, "cpu": [0.001] * 3}}
    got = {"rate": [180.0, 120.0, 240.0], "first": [0.1] * 3, "cpu": [0.003] * 3}
    row = loader.summary_row(("uint8", 64, 0, 2), got, runs, 0.5)
    if cores >= 2:
        assert row["cores"] == 2 and row["reference"] == "torchvision"
        assert row["vs_bare_decode"] == 0.9 and row["vs_bare_decode_range"] == [0.8, 0.96]  # paired: 0.9, 0.8, 0.96
        assert row["verdict"] == "meets" and "cpu_ms_per_sample" not in row
    row = loader.summary_row(("uint8", 64, 0, 1), {**got, "rate": [90.0, 70.0, 95.0]}, runs, 0.5)
    assert row["reference"] == "torchvision" and row["verdict"] == "not resolved"  # 0.9, 0.7, 0.95
    assert row["cpu_vs_bare_decode"] == round(1 / 3, 3)  # 1 ms per image bare, 3 ms per sample loaded
    assert "image_path_cpu_vs_bare_decode" not in row  # not measured at this R
    runs[("image_path", 64)] = {"rate": [], "cpu": [0.0012, 0.0025, 0.0013], "first": []}
    row = loader.summary_row(("uint8", 64, 0, 1), {**got, "rate": [90.0, 70.0, 95.0]}, runs, 0.5)
    assert row["image_path_cpu_ms_per_sample"] == 1.3 and row["image_path_cpu_vs_bare_decode"] == round(1 / 1.3, 3)
    one = loader.summary_row(("uint8", 64, 0, 1), {**got, "rate": [90.0], "first": [0.1], "cpu": [0.003]},
                             {key: {"rate": v["rate"][:1], "cpu": v["cpu"][:1]} for key, v in runs.items()}, 0.5)
    assert one["vs_bare_decode"] == 0.9 and one["verdict"] == "not resolved"  # one repeat: no spread


def test_the_image_path_reference_crops_every_image_once_at_r(bench, monkeypatch) -> None:
    """The image-path reference runs the loader's own image work (``load_image_crop``) once per image, with the
    centre-square box of its size and the loader's R."""
    loader = bench("loader")
    calls = []
    monkeypatch.setattr(loader, "load_image_crop", lambda *args: calls.append(args))
    images, sizes = [b"a", b"b", b"c"], [(40, 30), (30, 50), (20, 20)]
    assert loader.image_path_s(images, sizes, 16) >= 0
    assert calls == [(b"a", (5, 0, 35, 30), 16, (40, 30)), (b"b", (0, 10, 30, 40), 16, (30, 50)),
                     (b"c", (0, 0, 20, 20), 16, (20, 20))]


def test_bare_decoding_on_threads_decodes_every_image_once(bench) -> None:
    loader = bench("loader")
    seen, lock = [], threading.Lock()

    def decode(data: bytes) -> None:
        with lock:
            seen.append(data)

    images = [bytes([i]) for i in range(7)]
    for threads in (1, 2, 3):
        seen.clear()
        wall, cpu = loader.bare_decode_s(images, decode, threads)
        assert sorted(seen) == images and wall >= 0 and cpu >= 0


def test_ab_rounds_pair_neighbours_and_call_a_difference_only_outside_its_ci(bench) -> None:
    """The A/B headline is the median over rounds of this tree's ms per sample / the baseline's; "faster" only when
    the bootstrap CI lies wholly below 1; one round never resolves; per-core figures pool every pair."""
    ab = bench("pipeline_cpu_ab")
    rounds = [{"baseline": {"ms": b, "per_core_runs": [1000 / b]}, "current": {"ms": c, "per_core_runs": [1000 / c]}}
              for b, c in ((10.2, 9.0), (12.0, 10.2), (11.0, 9.9), (10.5, 9.2))]
    got = ab.summarize(rounds)
    ratios = [9.0 / 10.2, 0.85, 0.9, 9.2 / 10.5]
    assert got["ms_ratio"]["rounds"] == pytest.approx(ratios)
    assert got["ms_ratio"]["median"] == pytest.approx(statistics.median(ratios))
    assert got["ms_ratio"]["verdict"] == "faster" and got["ms_ratio"]["ci95"][1] < 1
    assert got["per_core"]["current"]["runs"] == pytest.approx([1000 / c for c in (9.0, 10.2, 9.9, 9.2)])
    assert got["per_core"]["baseline"]["verdict"] == "misses"  # 83-98 per core: all under 100
    mixed = rounds[:2] + [{"baseline": {"ms": 9.0, "per_core_runs": [111.0]},
                           "current": {"ms": 10.0, "per_core_runs": [100.0]}}] * 2
    assert ab.summarize(mixed)["ms_ratio"]["verdict"] == "not resolved"
    assert ab.summarize(rounds[:1])["ms_ratio"]["verdict"] == "not resolved"


def test_ab_runs_each_version_on_its_own_code(bench, monkeypatch, tmp_path) -> None:
    """The baseline run gets the revision's package first on PYTHONPATH, this tree's run no PYTHONPATH at all; a
    record that ran other code than intended is an error, not a result."""
    ab = bench("pipeline_cpu_ab")
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    site = str(tmp_path / "site")
    assert ab.variant_env("baseline", site)["PYTHONPATH"] == site
    assert "PYTHONPATH" not in ab.variant_env("current", site)
    code = {"path": os.path.join(site, "spatext", "pipeline")}

    def fake_run(cmd, env, cwd, capture_output, text):
        assert cwd == str(tmp_path) and cmd[-2:] == ["--out", str(tmp_path)]
        (tmp_path / "pipeline_cpu.json").write_text(json.dumps({"code": code["path"]}))
        failed = code["path"] == "fails"
        return argparse.Namespace(returncode=1 if failed else 0, stderr="ImportError: cannot import name 'x'\n")

    monkeypatch.setattr(ab.subprocess, "run", fake_run)
    assert ab.run_variant("baseline", site, [], str(tmp_path))["code"] == code["path"]
    with pytest.raises(RuntimeError, match="current run used the code at"):
        ab.run_variant("current", site, [], str(tmp_path))
    code["path"] = "/work/tree/pipeline"
    assert ab.run_variant("current", site, [], str(tmp_path))["code"] == code["path"]
    with pytest.raises(RuntimeError, match="baseline run used the code at"):
        ab.run_variant("baseline", site, [], str(tmp_path))
    code["path"] = "fails"
    with pytest.raises(RuntimeError, match=r"failed on the baseline code \(exit 1\):\nImportError: cannot import"):
        ab.run_variant("baseline", site, [], str(tmp_path))


def test_ab_refuses_a_baseline_that_names_no_commit(bench, tmp_path) -> None:
    ab = bench("pipeline_cpu_ab")
    with pytest.raises(ValueError, match="names no commit"):
        ab.install_revision("no-such-revision-anywhere", str(tmp_path / "site"))
    assert not (tmp_path / "site").exists()
