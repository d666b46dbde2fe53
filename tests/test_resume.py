"""Restartability: per-unit markers, --resume after a killed run, target shard sizes, --overwrite / --resume rules."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

from conftest import assert_same_rows, read_rows
from spatext.pipeline import build, verify
from spatext.pipeline.demo_corpus import write_corpus
from spatext.pipeline.write import UNITS_DIR, list_files, list_parquet, read_markers, row_bytes, unit_name

TINY = ["--clip-model", "spatext-tiny", "--clip-pretrained", "none", "--image-size", "128"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_corpus")
    write_corpus(str(root), 24, seed=5, fmt="webdataset", samples_per_shard=2)  # 12 units
    return root


def _argv(corpus, out, *extra):
    return ["--input", str(corpus / "shard-*.tar"), "--output", str(out), *TINY, *extra]


def _keys(out) -> list[str]:
    tables = [pq.read_table(p, columns=["key"]) for p in list_parquet(str(out))]
    return sorted(k for t in tables for k in t.column("key").to_pylist())


@pytest.fixture(scope="module")
def full(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, build.run(_argv(corpus, out))


def test_units_have_markers_and_counts(full):
    out, manifest = full
    markers = read_markers(str(out))
    assert len(markers) == 12 and manifest["counts"]["units"] == 12
    assert all(m["read"] == m["accepted"] + m["rejected"] == 2 for m in markers)
    assert {m["source"].rsplit("/", 1)[1] for m in markers} == {f"shard-{i:05d}.tar" for i in range(12)}
    assert unit_name("/a/b/shard-00001.tar").startswith("shard-00001.tar-")
    assert unit_name("/a/b/shard-00001.tar") != unit_name("/c/shard-00001.tar")  # same basename, other folder


def test_resume_of_a_complete_build_does_nothing(full, corpus):
    out, manifest = full
    again = build.run(_argv(corpus, out, "--resume"))
    assert again["units_this_run"] == 0
    assert again["counts"] == manifest["counts"] and again["shards"] == manifest["shards"]


def test_resume_redoes_only_missing_units(full, corpus, tmp_path):
    out, _ = full
    partial = tmp_path / "partial"
    build.run(_argv(corpus, partial))
    lost = read_markers(str(partial))[3]
    os.remove(os.path.join(partial, UNITS_DIR, unit_name(lost["source"]) + ".json"))
    for shard in lost["shards"]:
        os.remove(os.path.join(partial, "shards", shard))
    resumed = build.run(_argv(corpus, partial, "--resume"))
    assert resumed["units_this_run"] == 1
    assert _keys(partial) == _keys(out)
    assert verify.verify_build(str(partial), progress=False).ok


def test_killed_run_resumes_to_the_same_keys(full, corpus, tmp_path):
    """Kill a real build process as soon as it has completed some units, then --resume it."""
    out, _ = full
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "spatext.pipeline.build", *_argv(corpus, killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list_files(str(killed), UNITS_DIR, ".json"):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list_files(str(killed), UNITS_DIR, ".json"))
    assert 0 < done < 12, f"the kill should land mid-write ({done} of 12 units done)"
    assert not os.path.exists(killed / "manifest.json")
    resumed = build.run(_argv(corpus, killed, "--resume"))
    assert resumed["units_this_run"] == 12 - done
    keys = _keys(killed)
    assert keys == _keys(out) and len(keys) == len(set(keys))  # none missing, no duplicates
    assert verify.verify_build(str(killed), progress=False).ok


def test_existing_output_needs_a_flag_and_resume_needs_the_same_settings(full, corpus):
    out, _ = full
    with pytest.raises(FileExistsError, match="--resume"):
        build.run(_argv(corpus, out))
    with pytest.raises(ValueError, match=r"differ from the build's .*: min_area \(build: 0\.\d+, now: 0\.1\)"):
        build.run(_argv(corpus, out, "--resume", "--min-area", "0.1"))
    with pytest.raises(ValueError, match="exclude"):
        build.run(_argv(corpus, out, "--resume", "--overwrite"))


def test_target_shard_size_splits_units(corpus, tmp_path):
    out = tmp_path / "small_shards"
    manifest = build.run(["--input", str(corpus / "shard-0000[0-2].tar"), "--output", str(out), *TINY,
                          "--target-shard-mb", "0.005"])
    shards = list_parquet(str(out))
    assert len(shards) > 3  # three units, some split
    target = 0.005 * 2**20
    for path in shards:
        rows = pq.read_table(path).to_pylist()
        assert len(rows) == 1 or sum(row_bytes(r) for r in rows) <= target
    assert sum(pq.read_metadata(p).num_rows for p in shards) == manifest["counts"]["accepted"] == 6


def test_units_per_run_writes_units_job_by_job_and_equals_one_job(full, corpus, tmp_path, monkeypatch):
    """--units-per-run 5: jobs of 5, 5 and 2 units in name order, the same rows as one job. A job that fails leaves
    the earlier jobs' units written (and no manifest), and --resume finishes the rest to the same keys."""
    out, manifest = full
    chunked = tmp_path / "chunked"
    again = build.run(_argv(corpus, chunked, "--units-per-run", "5"))
    assert again["counts"] == manifest["counts"] and again["units_this_run"] == 12  # the three jobs' units
    assert_same_rows(read_rows(chunked), read_rows(out))  # embeddings up to float16 rounding: batches differ
    assert verify.verify_build(str(chunked), progress=False).ok

    jobs = []
    real = build.build_pipeline

    def second_job_fails(p, config, started_at, skip=frozenset(), manifest=True, earlier_jobs=0):
        jobs.append(12 - len(skip))  # units this job reads
        if len(jobs) == 2:
            raise RuntimeError("the machine went away")
        return real(p, config, started_at, skip, manifest, earlier_jobs)

    monkeypatch.setattr(build, "build_pipeline", second_job_fails)
    failed = tmp_path / "failed"
    with pytest.raises(RuntimeError, match="went away"):
        build.run(_argv(corpus, failed, "--units-per-run", "5"))
    markers = read_markers(str(failed))
    assert jobs == [5, 5] and len(markers) == 5 and not os.path.exists(failed / "manifest.json")
    assert sorted(m["source"] for m in markers) == sorted(m["source"] for m in read_markers(str(out)))[:5]
    monkeypatch.setattr(build, "build_pipeline", real)
    resumed = build.run(_argv(corpus, failed, "--resume", "--units-per-run", "4"))  # the job size may change
    assert _keys(failed) == _keys(out) and resumed["counts"] == manifest["counts"]
    assert resumed["units_this_run"] == 7  # jobs of 4 and 3 units
    folder = tmp_path / "folder_corpus"
    folder.mkdir()
    (folder / "captions.jsonl").write_text("")
    with pytest.raises(ValueError, match="--units-per-run applies to tar and parquet"):
        build.job_skips(build.BuildConfig(input=str(folder), output="o", units_per_run=2), frozenset())


def test_units_per_run_on_a_folder_corpus_is_refused_before_the_output_is_written(tmp_path):
    """The refusal comes before --output is touched, so the corrected command is not refused as a rerun."""
    write_corpus(str(tmp_path / "folder"), 2, seed=0, fmt="folder")
    out = tmp_path / "out"
    argv = ["--input", str(tmp_path / "folder"), "--output", str(out), *TINY]
    with pytest.raises(ValueError, match="--units-per-run applies to tar and parquet inputs"):
        build.run([*argv, "--units-per-run", "2"])
    assert not out.exists() or not any(out.iterdir())
    assert build.run(argv)["counts"]["accepted"] == 2


def test_resume_checks_completed_files_and_follows_a_moved_build(full, corpus, tmp_path):
    out, _ = full
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    lost = read_markers(str(moved))[0]
    os.remove(os.path.join(moved, "shards", lost["shards"][0]))
    with pytest.raises(FileNotFoundError, match=r"missing, e\.g\. .*" + lost["shards"][0]):
        build.run(_argv(corpus, moved, "--resume"))
    os.remove(os.path.join(moved, UNITS_DIR, unit_name(lost["source"]) + ".json"))  # as the message advises
    resumed = build.run(_argv(corpus, moved, "--resume"))  # another --output than the build was made with
    assert resumed["units_this_run"] == 1 and _keys(moved) == _keys(out)


@pytest.mark.parametrize(("extra", "match"), [
    (["--rows-per-groups", "2"], r"unknown flag\(s\) --rows-per-groups:"),  # as typed
    (["--rows_per_groups=2"], r"unknown flag\(s\) --rows_per_groups:"),
    (["corpus/shard-00001.tar", "corpus/shard-00002.tar"], r"unexpected argument\(s\) corpus/shard-00001\.tar"),
])
def test_unknown_arguments_are_refused(extra, match, tmp_path, caplog):
    with pytest.raises(ValueError, match=match):
        build.parse_args(["--input", "corpus/shard-00000.tar", "--output", str(tmp_path / "o"), *extra])
    assert "Discarding unparseable args" not in caplog.text  # the error says it; Beam's warning no longer precedes it
    beam = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing", "--save_main_session",
            "--runner=PortableRunner", "--job_endpoint", "localhost:8099", "--environment_type", "LOOPBACK"]
    assert build.parse_args(["--input", "c/*.tar", "--output", "o", *beam])[1] == beam


def test_a_cuda_device_is_checked_where_the_job_runs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda:1: torch sees no CUDA device"):
        build.check_device("cuda:1")
    build.check_device("cpu")
    assert build.runs_here(build.PipelineOptions([])) and build.runs_here(build.PipelineOptions(["--runner=direct"]))
    assert not build.runs_here(build.PipelineOptions(["--runner=DataflowRunner"]))


def test_resume_names_the_input_spelling_and_allows_a_new_row_group_size(full, corpus, tmp_path, monkeypatch, caplog):
    out, manifest = full
    monkeypatch.chdir(corpus)  # the same files, spelled relative to here: units are named by the spelling
    with pytest.raises(ValueError, match=r"--input 'shard-\*\.tar' differs .* matches the same files from here"):
        build.run(["--input", "shard-*.tar", "--output", str(out), *TINY, "--resume"])
    monkeypatch.chdir(tmp_path)
    shutil.copy(corpus / "shard-00000.tar", tmp_path)
    with pytest.raises(ValueError, match="from this directory it matches other files"):
        build.run(["--input", "shard-*.tar", "--output", str(out), *TINY, "--resume"])
    again = build.run(_argv(corpus, out, "--resume", "--rows-per-group", "7"))  # row groups do not change rows
    assert again["units_this_run"] == 0 and again["counts"] == manifest["counts"]
    fresh = tmp_path / "typo"
    with caplog.at_level("WARNING", logger="spatext.pipeline.build"):
        built = build.run(["--input", str(corpus / "shard-0000[0-1].tar"), "--output", str(fresh), *TINY, "--resume"])
    assert built["counts"]["accepted"] == 4 and f"--output {fresh} holds no build to resume" in caplog.text


def test_resume_warns_about_completed_units_the_input_no_longer_matches(corpus, tmp_path, caplog):
    copy = tmp_path / "corpus"
    copy.mkdir()
    for i in range(3):
        shutil.copy(corpus / f"shard-{i:05d}.tar", copy)
    out = tmp_path / "out"
    build.run(["--input", str(copy / "shard-*.tar"), "--output", str(out), *TINY])
    os.remove(copy / "shard-00001.tar")
    with caplog.at_level("WARNING", logger="spatext.pipeline.build"):
        again = build.run(["--input", str(copy / "shard-*.tar"), "--output", str(out), *TINY, "--resume"])
    assert again["units_this_run"] == 0
    assert f"1 completed unit(s) are no longer matched by --input {copy / 'shard-*.tar'}" in caplog.text
    assert str(copy / "shard-00001.tar") in caplog.text


def test_ctrl_c_in_a_transform_is_one_line_with_the_resume_hint(monkeypatch, capsys):
    def interrupted(argv):
        raise RuntimeError("KeyboardInterrupt [while running 'Write/WriteUnit']")

    monkeypatch.setattr(build, "run", interrupted)
    assert build.main([]) == 130
    assert "interrupted; the units completed so far are kept: run the same command with --resume" in \
        capsys.readouterr().err
    monkeypatch.setattr(build, "run", lambda argv: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="other"):
        build.main([])


def _three_tar_corpus(corpus, folder):
    folder.mkdir()
    for i in range(3):
        shutil.copy(corpus / f"shard-{i:05d}.tar", folder)
    return folder


def test_an_output_path_with_glob_characters_is_taken_literally(corpus, tmp_path):
    """runs/b[1]?: its shards, markers and manifest are found (they were listed as the glob 'b1' and friends)."""
    copy = _three_tar_corpus(corpus, tmp_path / "corpus")
    out = tmp_path / "b[1]?"
    manifest = build.run(["--input", str(copy / "shard-*.tar"), "--output", str(out), *TINY])
    assert manifest["counts"]["read"] == 6 and manifest["counts"]["units"] == 3
    report = verify.verify_build(str(out), progress=False)
    assert report.ok and report.rows == manifest["counts"]["accepted"]
    assert build.run(["--input", str(copy / "shard-*.tar"), "--output", str(out), *TINY, "--resume"])[
        "units_this_run"] == 0


def test_overwrite_deletes_only_a_builds_own_files_and_never_its_input(corpus, full, tmp_path):
    """A folder holding another tool's files is no build; a build refuses to mix with them; an input inside the
    output's tables is refused before --overwrite could delete it."""
    data = tmp_path / "data"
    (data / "shards").mkdir(parents=True)
    (data / "manifest.json").write_text('{"made by": "another tool"}')
    (data / "shards" / "part-0001.parquet").write_bytes(b"not ours")
    with pytest.raises(ValueError, match=r"holds files no spatext build wrote, e\.g\. .*part-0001\.parquet"):
        build.run(["--input", str(corpus / "shard-0000[01].tar"), "--output", str(data), *TINY, "--overwrite"])
    assert (data / "manifest.json").exists() and (data / "shards" / "part-0001.parquet").exists()
    out, _ = full  # a build's own shards as the input of a rebuild into the same folder
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(ValueError, match=r"matches files inside --output .*would delete its input"):
        build.run(["--input", str(copy / "shards" / "*.parquet"), "--output", str(copy), *TINY, "--overwrite",
                   "--segmenter-weights", "none"])
    assert list_parquet(str(copy)) == sorted(str(copy / "shards" / p) for p in os.listdir(copy / "shards"))
    assert len(list_parquet(str(copy))) == len(list_parquet(str(out)))


def test_resume_refuses_an_input_file_that_changed_and_removes_orphans(corpus, tmp_path, caplog):
    copy = _three_tar_corpus(corpus, tmp_path / "corpus")
    out = tmp_path / "out"
    argv = ["--input", str(copy / "shard-*.tar"), "--output", str(out), *TINY]
    build.run(argv)
    assert all(m["input_size"] > 0 for m in read_markers(str(out)))
    orphan = out / "shards" / f"{unit_name('gone.tar')}-00000.parquet"  # a unit killed while writing, now gone
    shutil.copy(next((out / "shards").iterdir()), orphan)
    with caplog.at_level("INFO", logger="spatext.pipeline.build"):
        assert build.run([*argv, "--resume"])["units_this_run"] == 0
    assert not orphan.exists() and "removing 1 file(s) that no completed unit lists" in caplog.text
    assert verify.verify_build(str(out), progress=False).ok
    shutil.copy(corpus / "shard-00005.tar", copy / "shard-00001.tar")  # other samples under a completed unit's name
    with open(copy / "shard-00001.tar", "ab") as handle:
        handle.write(b"\0" * 512)  # another size for sure
    with pytest.raises(ValueError, match=r"1 input file\(s\) changed since their units were built, e\.g\. "
                                         r".*shard-00001\.tar \(\d+ -> \d+ bytes\)"):
        build.run([*argv, "--resume"])
