"""The `spatext` dispatcher: bad input gives a one-line error and exit status 2, not a traceback."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import subprocess
import sys

import pytest

from spatext.cli import DEBUG_ENV, command_logging, main


def test_bad_input_is_a_message_and_status_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    pattern = str(tmp_path / "missing" / "*.tar")
    assert main(["build", "--input", pattern, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"spatext build: error: --input '{pattern}' matches no file" in err
    assert "Traceback" not in err and DEBUG_ENV in err
    assert main(["sample", "--run", str(tmp_path / "nothing"), "--prompt", "p", "--out", str(tmp_path / "x.png")]) == 2
    assert "spatext sample: error: --run" in capsys.readouterr().err


def test_debug_env_keeps_the_exception(tmp_path, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="matches no file"):
        main(["build", "--input", str(tmp_path / "*.tar"), "--output", str(tmp_path / "out")])


def test_usage_and_unknown_command(capsys):
    assert main([]) == 0 and "commands:" in capsys.readouterr().out
    assert main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--device", "tpu"], "--device must be cpu, cuda, cuda:N, mps or xpu; got 'tpu'"),
    (["--jpeg-quality", "0"], "--jpeg-quality must be in 1..100, got 0"),
    (["--jpeg-quality", "1000"], "--jpeg-quality must be in 1..100, got 1000"),
    (["--max-pixels", "0"], "--max-pixels must be >= 256"),
    (["--k-min", "3", "--k-max", "2"], "--k-min <= --k-max"),
    (["--precision", "bf16"], "--precision bf16 applies on cuda only (--device cpu runs the models in fp32)"),
    # the default CLIP weights offline: checked on the launcher, before --output is created
    (["--clip-model", "ViT-B-32"], "--clip-pretrained 'openai': the weights of ViT-B-32 are not available"),
    (["--segmenter-threshold", "1.5"], "--segmenter-threshold must lie in [0, 1], got 1.5"),
    (["--segmenter-mask-threshold", "-0.1"], "--segmenter-mask-threshold must lie in [0, 1], got -0.1"),
    (["--segmenter-overlap-threshold", "nan"], "--segmenter-overlap-threshold must lie in [0, 1], got nan"),
    (["--input-format", "folder"], "in.tar/captions.jsonl does not exist (a folder corpus is a directory holding"),
    *([] if importlib.util.find_spec("detectron2") else [  # a launcher that would run it without the package
        (["--segmenter", "detectron2", "--clip-model", "spatext-tiny", "--clip-pretrained", "none"],
         "--segmenter detectron2 needs detectron2, which is not on PyPI")]),
])
def test_bad_build_settings_are_a_message_and_status_2(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    (tmp_path / "in.tar").write_bytes(b"")
    out = tmp_path / "out"
    assert main(["build", "--input", str(tmp_path / "in.tar"), "--output", str(out), "--segmenter", "annotations",
                 *flags]) == 2
    err = capsys.readouterr().err
    assert "spatext build: error: " in err and message in err and "Traceback" not in err
    assert not out.exists()


def test_verify_and_inspect_without_a_build_are_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert main(["verify", str(tmp_path / "nothere")]) == 2
    assert f"spatext verify: error: '{tmp_path / 'nothere'}' holds no build" in capsys.readouterr().err
    for num in ("0", "-3"):
        assert main(["inspect", str(tmp_path), "--out", str(tmp_path / "g.png"), "--num", num]) == 2
        assert f"spatext inspect: error: --num must be >= 1, got {num}" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path), "--out", str(tmp_path / "g.png"), "--tile", "100000"]) == 2  # was OOM
    assert "spatext inspect: error: --tile must be <= 2048" in capsys.readouterr().err


def test_a_build_that_rejects_every_input_verifies_and_says_so(tmp_path, capsys):
    (tmp_path / "in.tar").write_bytes(b"")  # unreadable: one read reject, no sample
    out = str(tmp_path / "out")
    assert main(["build", "--input", str(tmp_path / "in.tar"), "--output", out, "--clip-model", "spatext-tiny",
                 "--clip-pretrained", "none"]) == 0  # --segmenter auto: nothing to probe, no model is loaded
    assert "no sample was accepted" in capsys.readouterr().out
    assert main(["verify", out]) == 0
    report = capsys.readouterr().out
    assert report.startswith("OK") and "1 reject row(s)" in report and "no sample was accepted" in report


def test_command_logging_shows_info_after_a_library_configured_warning(monkeypatch) -> None:
    """A root handler that logging added at WARNING (Beam's import-time warning does that) no longer hides INFO."""
    stream = io.StringIO()
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.StreamHandler(stream)])
    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)
    logging.getLogger("spatext.test").info("before")
    command_logging()
    logging.getLogger("spatext.test").info("after")
    assert stream.getvalue() == "after\n"


def test_train_prints_the_prior_report(demo_shards, tmp_path) -> None:
    """`spatext train --config prior-tiny` as a user runs it (a fresh process, Beam imported): the held-out line."""
    done = subprocess.run(
        [sys.executable, "-m", "spatext.cli", "train", "--data", str(demo_shards), "--config", "prior-tiny",
         "--output", str(tmp_path / "prior"), "--max-train-steps", "5"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "prior: held-out cosine" in done.stderr
    assert "random weights in this run: clip" in done.stderr  # the demo shards were embedded by a random CLIP
    record = json.loads((tmp_path / "prior" / "run.json").read_text())
    assert set(record["args"]) == {"data", "config", "output", "max_train_steps", "train_batch_size",
                                   "learning_rate", "seed"}  # not the denoiser's scheduler / EMA / clipping flags
    assert "cosine decay" in record["optimization"] and record["random_init"]
    assert record["metrics"]["batch_size_used"] == min(256, record["metrics"]["num_train"])
    assert record["lineage"]["shard_files"] and all(os.path.exists(f) for f in record["lineage"]["shard_files"])
    again = subprocess.run(  # a second prior run into the same folder is refused, as for a denoiser
        [sys.executable, "-m", "spatext.cli", "train", "--data", str(demo_shards), "--config", "prior-tiny",
         "--output", str(tmp_path / "prior"), "--max-train-steps", "5"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )
    assert again.returncode == 2 and "already holds a run" in again.stderr


def test_the_module_form_of_build_answers_bad_input_like_the_command(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "spatext.pipeline.build", "--input", str(tmp_path / "x.tar"),
                           "--output", str(tmp_path / "o"), "--device", "tpu"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert done.returncode == 2 and "spatext build: error: --device must be" in done.stderr
    assert "Traceback" not in done.stderr
