"""`spatext train`: the real script on tiny configs (latent-tiny + the tiny base model, pixel-tiny) and demo shards.

Runs call `train.main(argv)` in-process and check what it wrote: the loss curve, checkpoints, the pipeline, run.json,
sample grids. Weights are random (tiny base model, spatext-tiny CLIP); what is tested is the machinery.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import statistics
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
from accelerate.state import AcceleratorState
from accelerate.utils import load as accelerate_load
from PIL import Image

from spatext.model import sample, train
from spatext.model.checkpoint import COUNTERS, STATE_FILE, DivergedError
from spatext.model.config import get_config
from spatext.model.data import ShardDataset
from spatext.model.denoiser import build_denoiser, predict
from spatext.model.pipeline import SpaTextPipeline
from spatext.model.prior import load_prior_lineage
from spatext.model.shard_files import resolve_files
from spatext.model.tiny_base import write_tiny_base_model
from spatext.model.train_args import check_args, ignored_by_prior, parse_args
from spatext.model.train_setup import load_prior_component

OVERFIT_STEPS = 60


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return write_tiny_base_model(str(tmp_path_factory.mktemp("base") / "tiny-sd"))


@pytest.fixture(scope="module")
def four_rows(demo_shards, tmp_path_factory) -> str:
    """The first 4 demo rows as one shard (metadata kept): with batch 4 every step sees the same batch."""
    source = resolve_files(str(demo_shards))[0]
    table = pq.read_table(source).slice(0, 4)
    out = tmp_path_factory.mktemp("four") / "shards"
    out.mkdir()
    pq.write_table(pa.Table.from_batches(table.to_batches(), schema=table.schema), out / "part.parquet")
    return str(out.parent)


def run_train(argv: list[str]) -> int:
    """One `spatext train` run in this process (accelerate's state is a process singleton: reset it after)."""
    try:
        return train.main(argv)
    finally:
        AcceleratorState._reset_state()


def _argv(data: str, base: str, out, config: str = "latent-tiny", steps: int = 4, *extra: str) -> list[str]:
    return ["--data", data, "--config", config, "--base-model", base, "--output", str(out), "--max-train-steps",
            str(steps), "--train-batch-size", "4", "--learning-rate", "2e-3", "--seed", "3", *extra]


def _losses(run) -> list[tuple[int, float]]:
    with open(os.path.join(run, "logs", "loss.csv")) as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def _record(run) -> dict:
    with open(os.path.join(run, "run.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def overfit(four_rows, base, tmp_path_factory) -> dict[str, str]:
    """60 steps on a fixed batch of 4, no condition dropout, no EMA; latent-tiny and pixel-tiny."""
    runs = {}
    for config in ("latent-tiny", "pixel-tiny"):
        out = tmp_path_factory.mktemp("overfit") / config
        assert run_train(_argv(four_rows, base, out, config, OVERFIT_STEPS, "--p-drop-text", "0", "--p-drop-st",
                               "0", "--ema-decay", "0", "--checkpointing-steps", "0")) == 0
        runs[config] = str(out)
    return runs


@pytest.mark.parametrize("config", ["latent-tiny", "pixel-tiny"])
def test_a_tiny_config_overfits_a_fixed_batch(overfit, config):
    losses = _losses(overfit[config])
    assert [step for step, _ in losses] == list(range(1, OVERFIT_STEPS + 1))
    start = statistics.mean(loss for _, loss in losses[:3])
    end = statistics.mean(loss for _, loss in losses[-10:])
    assert end < 0.5 * start, (start, end)


def test_checkpoint_reloads_to_identical_outputs(overfit, base):
    run = overfit["latent-tiny"]
    loaded = SpaTextPipeline.from_pretrained(os.path.join(run, "pipeline")).unet
    config = get_config("latent-tiny")
    fresh = build_denoiser(config, base)
    checkpoint = os.path.join(run, "checkpoints", f"checkpoint-{OVERFIT_STEPS}")
    fresh.load_state_dict(safetensors.torch.load_file(os.path.join(checkpoint, "model.safetensors")), strict=True)
    untrained = build_denoiser(config, base)
    g = torch.Generator().manual_seed(0)
    sample, st = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 64, 8, 8, generator=g)
    text = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        outputs = [predict(unet, sample, st, torch.tensor([10, 500]), text) for unet in (loaded, fresh, untrained)]
    assert torch.equal(outputs[0], outputs[1])  # pipeline == checkpoint, bit for bit
    assert not torch.allclose(outputs[0], outputs[2])  # and training changed it
    assert not loaded.conv_in.weight[:, 4:].eq(0).all()  # the ST input weights (zero at init) were trained


def test_run_dir_has_lineage_and_a_loadable_pipeline(overfit, four_rows, base):
    run = overfit["latent-tiny"]
    record = _record(run)
    assert record["kind"] == "denoiser" and record["status"] == "finished" and record["global_step"] == OVERFIT_STEPS
    assert record["config"] == get_config("latent-tiny").to_dict() and record["args"]["p_drop_st"] == 0
    lineage = record["lineage"]
    assert lineage["shard_files"] == resolve_files(four_rows) and lineage["num_rows"] == 4
    assert lineage["clip_model"] == "spatext-tiny" and lineage["clip_pretrained"] == "none (random init)"
    assert lineage["shards"]["embed_dim"] == "64" and lineage["base_model"] == base
    assert lineage["prior"] == "untrained (identity)"
    assert "local_encoder" in record["random_init"]
    assert lineage["base_model_weights"] == "none (random init)"  # the tiny base model's marker, read back
    assert "base model (unet, vae, text_encoder): none (random init)" in record["random_init"]
    assert record["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    pipe = SpaTextPipeline.from_pretrained(os.path.join(run, "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt="a triangle on sand", scene=[(torch.ones(32, 32), "sand")], num_inference_steps=2).images[0]
    assert image.size == (32, 32)
    pixel = SpaTextPipeline.from_pretrained(os.path.join(overfit["pixel-tiny"], "pipeline"))
    pixel_record = _record(overfit["pixel-tiny"])  # its UNet is trained from random init: not a random part
    assert pixel.vae is None and "unet" not in pixel_record["random_init"]
    assert pixel_record["lineage"]["unet_init"] == "random init"
    assert "base model (text_encoder): none (random init)" in pixel_record["random_init"]  # all it takes from it


def _weights(run) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(os.path.join(run, "pipeline", "unet", "diffusion_pytorch_model.safetensors"))


RESUME_EXTRA = ("--checkpointing-steps", "2", "--sample-every", "2", "--num-validation", "2", "--sample-steps", "2")
# flags a resume may change (RESUME_MAY_CHANGE): none of them changes the weights
RESUME_CHANGES = ("--decode-threads", "1", "--log-sample-keys", "--sample-steps", "1", "--checkpoints-total-limit", "3")


def _state(run, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"checkpoint-{step}" / STATE_FILE).read_text())


def _elapsed(run) -> list[float]:
    with open(os.path.join(run, "logs", "loss.csv")) as f:
        return [float(r["elapsed_s"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def resumed(demo_shards, base, tmp_path_factory) -> dict:
    """A run of 4 steps resumed to 6 (changing only flags a resume may change), and an uninterrupted 6-step run."""
    root = tmp_path_factory.mktemp("resume")
    out, straight = root / "resumed", root / "straight"
    assert run_train(_argv(str(demo_shards), base, out, "latent-tiny", 4, *RESUME_EXTRA)) == 0
    first = {"record": _record(out), "elapsed": _elapsed(out)}
    with pytest.raises(ValueError, match="already holds a run"):
        run_train(_argv(str(demo_shards), base, out, "latent-tiny", 6, *RESUME_EXTRA))
    assert run_train(_argv(str(demo_shards), base, out, "latent-tiny", 6, *RESUME_EXTRA, *RESUME_CHANGES,
                           "--resume-from-checkpoint", "latest")) == 0
    # (decoding in the loop itself instead of 2 threads: the same batches in the same order)
    assert run_train(_argv(str(demo_shards), base, straight, "latent-tiny", 6, *RESUME_EXTRA,
                           "--decode-threads", "1")) == 0
    return {"resumed": out, "straight": straight, "first": first}


def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(resumed):
    out, straight = resumed["resumed"], resumed["straight"]
    assert resumed["first"]["record"]["global_step"] == 4
    record = _record(out)
    assert record["global_step"] == 6 and record["status"] == "finished" and record["epoch"] == 1  # 3 batches/epoch
    assert record["args"]["decode_threads"] == 1 and record["args"]["max_train_steps"] == 6  # what this session used
    assert [step for step, _ in _losses(out)] == [1, 2, 3, 4, 5, 6]
    names = sorted(os.listdir(out / "checkpoints"))
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    state = _state(out, 6)
    assert {k: state[k] for k in COUNTERS} == {"global_step": 6, "epoch": 1, "batch_in_epoch": 3, "micro_step": 6}
    checkpoint = out / "checkpoints" / "checkpoint-6"
    assert sorted(os.listdir(checkpoint)) == ["ema.safetensors", "model.safetensors", "optimizer.bin",
                                              "random_states_0.pkl", "scheduler.bin", STATE_FILE]
    for name in ("optimizer.bin", "scheduler.bin"):  # nothing in a checkpoint needs unsafe unpickling
        torch.load(checkpoint / name, weights_only=True)
    assert accelerate_load(checkpoint / "random_states_0.pkl")["step"] == 6  # weights_only + numpy allowlist
    assert sorted(os.listdir(out / "samples")) == ["step-2.png", "step-4.png", "step-6.png"]
    grid = Image.open(out / "samples" / "step-6.png")
    assert grid.size[1] > 2 * 128  # two validation rows
    assert _title_lines(grid, 2)  # the step line and the random-weights line (this run's parts are random)
    # an uninterrupted 6-step run ends with the same weights, EMA included: the checkpoint restored everything
    a, b = _weights(out), _weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(out) == _losses(straight)


def test_resumed_run_records_totals_over_both_sessions(resumed):
    out, straight = resumed["resumed"], resumed["straight"]
    record = _record(out)
    # samples: 6 steps x batch 4 in both runs, not only the 2 steps of the resumed session
    assert record["ranks"]["samples"] == _record(straight)["ranks"]["samples"] == [24]
    assert _state(out, 4)["samples"] == [16] and _state(out, 6)["samples"] == [24]
    assert _state(out, 6)["last_loss"] == record["last_loss"] == pytest.approx(_losses(out)[-1][1], abs=1e-6)
    # time runs on from the checkpoint: elapsed never goes back, the wall time covers both sessions
    elapsed = _elapsed(out)
    assert elapsed[:4] == resumed["first"]["elapsed"][:4] and elapsed == sorted(elapsed)
    assert elapsed[4] > _state(out, 4)["elapsed_s"] >= elapsed[3]
    assert record["wall_time_s"] > _state(out, 4)["elapsed_s"] and record["wall_time_s"] >= elapsed[-1]


def test_a_run_stopped_after_its_last_checkpoint_gets_its_end_written(resumed, demo_shards, base, tmp_path):
    out = tmp_path / "stopped"  # a copy of the 6-step run, as if it stopped before writing its final run.json
    shutil.copytree(resumed["resumed"], out)
    shutil.rmtree(out / "pipeline")
    stopped = {**_record(out), "status": "in progress", "ranks": None}
    (out / "run.json").write_text(json.dumps(stopped))
    assert run_train(_argv(str(demo_shards), base, out, "latent-tiny", 6, *RESUME_EXTRA,
                           "--resume-from-checkpoint", "latest")) == 0
    record, final = _record(out), _record(resumed["resumed"])
    assert record["status"] == "finished" and record["global_step"] == 6 and record["last_loss"] == final["last_loss"]
    assert record["ranks"] == final["ranks"]  # samples from the checkpoint, fingerprint of the same weights
    assert _weights(out).keys() == _weights(resumed["resumed"]).keys()


@pytest.mark.parametrize(
    "changes",
    [
        ("--learning-rate", "1e-3"),
        ("--seed", "4"),
        ("--train-batch-size", "2"),
        ("--p-drop-st", "0.5"),
        ("--dataloader-num-workers", "1"),
        ("--mixed-precision", "bf16"),
        ("--data", "FOUR_ROWS", "--lr-scheduler", "cosine"),
    ],
)
def test_resume_refuses_flags_that_change_what_the_run_trains(resumed, demo_shards, base, four_rows, changes):
    out = resumed["resumed"]
    before = (out / "run.json").read_bytes()
    argv = _argv(str(demo_shards), base, out, "latent-tiny", 8, *RESUME_EXTRA, "--resume-from-checkpoint", "latest",
                 *[four_rows if c == "FOUR_ROWS" else c for c in changes])
    flags = changes[::2]
    with pytest.raises(ValueError, match="flags differ from the run") as error:
        run_train(argv)
    message = str(error.value)
    assert "\n" not in message and all(f"{flag} " in message.split("; resume with")[0] for flag in flags)
    assert (out / "run.json").read_bytes() == before and not (out / "checkpoints" / "checkpoint-8").exists()


def test_resume_checks_a_checkpoints_own_flags_when_its_run_json_is_missing(resumed, demo_shards, base, tmp_path):
    """A run killed after its checkpoint but before run.json: the checkpoint records what it was trained with."""
    out = tmp_path / "killed"
    shutil.copytree(resumed["resumed"], out)
    (out / "run.json").unlink()
    identity = _state(out, 6)["run"]
    assert identity["args"]["decode_threads"] == 1 and identity["config"]["name"] == "latent-tiny"
    assert identity["lineage"]["num_rows"] == _record(resumed["resumed"])["lineage"]["num_rows"]
    with pytest.raises(ValueError, match=r"flags differ from the run .*--learning-rate 0\.001 \(run: 0\.002\)"):
        run_train(_argv(str(demo_shards), base, out, "latent-tiny", 8, *RESUME_EXTRA, "--resume-from-checkpoint",
                        "latest", "--learning-rate", "1e-3"))
    with pytest.raises(ValueError, match=r"--config 'pixel-tiny' differs from the config of the run"):
        run_train(_argv(str(demo_shards), base, out, "pixel-tiny", 8, *RESUME_EXTRA, "--resume-from-checkpoint",
                        "latest"))
    more = tmp_path / "more"  # as if the run had trained on this copy of the shards, which then gets another file
    shutil.copytree(demo_shards, more)
    state_file = out / "checkpoints" / "checkpoint-6" / STATE_FILE
    state = json.loads(state_file.read_text())
    state["run"]["args"]["data"] = str(more)
    state_file.write_text(json.dumps(state))
    shutil.copy(resolve_files(str(demo_shards))[0], more / "shards" / "extra.parquet")
    with pytest.raises(ValueError, match=r"changed since the run started.*added extra.parquet"):
        run_train(_argv(str(more), base, out, "latent-tiny", 8, *RESUME_EXTRA, "--resume-from-checkpoint", "latest"))
    assert not (out / "run.json").exists() and not (out / "checkpoints" / "checkpoint-8").exists()


def test_resume_refuses_a_checkpoint_with_later_ones_beside_it(resumed, demo_shards, base):
    """Resuming step 2 where steps 4 and 6 of the run that went on from it lie would mix the two runs' checkpoints."""
    out = resumed["resumed"]
    before = (out / "run.json").read_bytes()
    argv = _argv(str(demo_shards), base, out, "latent-tiny", 8, *RESUME_EXTRA, "--resume-from-checkpoint",
                 "checkpoint-2")
    with pytest.raises(ValueError, match=r"is step 2, but .*checkpoints also holds checkpoint-4, checkpoint-6"):
        run_train(argv)
    assert (out / "run.json").read_bytes() == before and sorted(os.listdir(out / "checkpoints")) == [
        "checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_resume_refuses_another_number_of_processes(resumed, demo_shards, base, monkeypatch):
    """The lr schedule and the place in the epoch count per process: a 1-process checkpoint resumes in 1 process."""
    out = resumed["resumed"]
    before = (out / "run.json").read_bytes()
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node 2 sets it; refused before anything starts
    argv = _argv(str(demo_shards), base, out, "latent-tiny", 8, *RESUME_EXTRA, "--resume-from-checkpoint", "latest")
    with pytest.raises(ValueError, match=r"written by a run of 1 process\(es\); this launch started 2"):
        run_train(argv)
    assert (out / "run.json").read_bytes() == before


@pytest.mark.parametrize("use_cpu", ["", "true"])
def test_fp16_without_a_gpu_is_refused_before_anything_is_written(demo_shards, base, tmp_path, monkeypatch, use_cpu):
    """No accelerator here, or `accelerate launch --cpu` (ACCELERATE_USE_CPU) on a machine that has one."""
    if use_cpu:
        monkeypatch.setenv("ACCELERATE_USE_CPU", use_cpu)
    elif torch.accelerator.is_available():
        pytest.skip("fp16 runs where there is an accelerator")
    output = tmp_path / "fp16"
    with pytest.raises(ValueError, match="--mixed-precision fp16 needs a GPU"):
        run_train(_argv(str(demo_shards), base, output, "latent-tiny", 2, "--mixed-precision", "fp16"))
    assert not output.exists()


def test_a_finished_run_is_not_rewritten(resumed, demo_shards, base, capsys):
    out = resumed["resumed"]
    files = [out / "run.json", out / "logs" / "loss.csv",
             out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"]
    before = [(f.read_bytes(), f.stat().st_mtime_ns) for f in files]
    argv = _argv(str(demo_shards), base, out, "latent-tiny", 4, *RESUME_EXTRA, "--resume-from-checkpoint", "latest")
    with pytest.raises(ValueError, match=r"--max-train-steps 4 is below step 6 of the checkpoint"):
        run_train(argv)
    argv[argv.index("--max-train-steps") + 1] = "6"
    assert run_train(argv) == 0
    assert "already finished at step 6" in capsys.readouterr().out
    assert [(f.read_bytes(), f.stat().st_mtime_ns) for f in files] == before


def test_gradient_accumulation_counts_optimizer_steps(four_rows, base, tmp_path):
    out = tmp_path / "accum"
    argv = _argv(four_rows, base, out, "pixel-tiny", 2, "--gradient-accumulation-steps", "2", "--ema-decay", "0",
                 "--train-batch-size", "2")  # the last --train-batch-size wins
    assert run_train(argv) == 0
    state = json.loads((out / "checkpoints" / "checkpoint-2" / STATE_FILE).read_text())
    assert state["global_step"] == 2 and state["micro_step"] == 4
    assert len(_losses(out)) == 2


def _title_lines(image: Image.Image, lines: int) -> bool:
    """Whether ``image`` starts with a title strip (its dark background at the top left) holding text in each of its
    first ``lines`` 12-px lines."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    bands = [pixels[2 + 12 * k : 14 + 12 * k] for k in range(lines)]
    return tuple(pixels[0, 0]) == (20, 20, 20) and all((band > 128).any() for band in bands)


def test_sample_grid_title_wraps_to_the_width():
    image = Image.new("RGB", (300, 100), "black")
    lines = ["step 3", "random weights (pretrained: none): " + "local_encoder, " * 6]
    titled = sample.with_title(image, lines)
    wrapped = 1 + len(textwrap.wrap(lines[1], 300 // 6))
    assert titled.size == (300, 100 + 12 * wrapped + 4) and wrapped >= 3 and _title_lines(titled, wrapped)


def test_prior_training_names_every_flag_it_ignores():
    """Prior training reads data, config, output, steps, batch, lr and seed: any other flag set is named."""
    required = ["--data", "d", "--config", "prior-tiny", "--output", "o"]
    args = parse_args([*required, "--seed", "3", "--learning-rate", "0.01", "--max-train-steps", "9"])
    check_args(args, prior=True)  # fills the prior's defaults (steps, batch, lr) as train does first
    assert ignored_by_prior(args) == []
    args = parse_args([*required, "--mixed-precision", "bf16", "--resolution", "64", "--p-drop-st", "0.5",
                       "--base-model", "b"])
    check_args(args, prior=True)
    assert sorted(ignored_by_prior(args)) == ["--base-model", "--mixed-precision", "--p-drop-st", "--resolution"]


def test_prior_config_trains_the_prior_and_a_denoiser_run_takes_it(demo_shards, base, tmp_path):
    prior_run = tmp_path / "prior"
    assert run_train(["--data", str(demo_shards), "--config", "prior-tiny", "--output", str(prior_run),
                      "--max-train-steps", "5"]) == 0
    assert (prior_run / "prior.safetensors").is_file() and _record(prior_run)["kind"] == "prior"
    out = tmp_path / "with-prior"
    assert run_train(_argv(str(demo_shards), base, out, "latent-tiny", 1, "--prior", str(prior_run))) == 0
    assert _record(out)["lineage"]["prior"] == str(prior_run)
    assert "prior (untrained: identity)" not in _record(out)["random_init"]
    # the prior knows its CLIP space (also from the weights file alone); a run in another space of its size refuses it
    lineage = load_prior_lineage(str(prior_run / "prior.safetensors"))
    assert lineage["clip_model"] == "spatext-tiny" and load_prior_lineage(str(prior_run)) == lineage
    dim = int(lineage["embed_dim"])
    assert load_prior_component(str(prior_run), dim, "spatext-tiny")[1] == str(prior_run)
    with pytest.raises(ValueError, match=r"trained on spatext-tiny embeddings but this run uses ViT-B-16"):
        load_prior_component(str(prior_run), dim, "ViT-B-16")


def test_the_untrained_prior_of_a_run_is_initialised_from_its_seed() -> None:
    """Without --prior, two runs of one seed save the same prior weights (its output layer starts at zero, so the
    prior is the identity whatever the others hold, but a checksum or a later fine-tune sees them)."""
    weights = [{k: v.clone() for k, v in load_prior_component(None, 16, seed=seed)[0].state_dict().items()}
               for seed in (0, 0, 1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_a_bf16_run_saves_the_base_weights_in_fp32_and_samples(four_rows, base, tmp_path):
    out = tmp_path / "bf16"
    assert run_train(_argv(four_rows, base, out, "latent-tiny", 1, "--mixed-precision", "bf16", "--ema-decay", "0",
                           "--checkpointing-steps", "0")) == 0
    for component in ("text_encoder", "vae"):  # the frozen parts trained in bf16 come back as the base's fp32 weights
        (saved,) = (out / "pipeline" / component).glob("*.safetensors")
        (original,) = (Path(base) / component).glob("*.safetensors")
        a, b = safetensors.torch.load_file(saved), safetensors.torch.load_file(original)
        assert a.keys() == b.keys() and all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a)
    scene = tmp_path / "scene.json"
    scene.write_text(json.dumps({"prompt": "a ball", "regions": [{"prompt": "a ball", "box": [0, 0, 0.5, 0.5]}]}))
    argv = ["--run", str(out), "--scene", str(scene), "--out", str(tmp_path / "x.png"), "--steps", "2"]
    assert sample.main(argv) == 0
    assert Image.open(tmp_path / "x.png").size == (32, 32)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--config", "latent-sd15"], "embed_dim=768 .* D=64"),
        (["--config", "prior-nope"], r"neither a bundled config \(denoisers: .*latent-tiny.*; priors: prior-base, "
                                     "prior-tiny\\)"),
        (["--clip-model", "ViT-B-32"], "differs from the shards' CLIP"),
        (["--p-drop-text", "1.5"], "--p-drop-text must be in"),
        (["--ema-decay", "1"], "--ema-decay must be in"),
        (["--decode-threads", "0"], "--decode-threads must be >= 1"),
        (["--checkpoints-total-limit", "-5"], r"--checkpoints-total-limit must be >= 1 \(or left out\), got -5"),
        (["--checkpoints-total-limit", "0"], "--checkpoints-total-limit must be >= 1"),
        (["--resolution", "0"], "--resolution must be >= 1"),
        (["--resolution", "63"], "--resolution 63 does not fit config 'latent-tiny': it must be a multiple of 8 "
                                 r"\(4 pixels per latent cell x 2, the UNet's downsampling\), e.g. 64"),
        (["--learning-rate", "nan"], "--learning-rate must be a finite number > 0, got nan"),
        (["--adam-weight-decay", "-5"], "--adam-weight-decay must be a finite number >= 0, got -5.0"),
        (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number >= 0, got nan"),
        (["--lr-scheduler", "bogus"], "--lr-scheduler 'bogus' is not a diffusers schedule; one of linear, cosine"),
        (["--lr-scheduler", "piecewise_constant"], "--lr-scheduler 'piecewise_constant' is not a diffusers schedule"),
        (["--prior", "MISSING"], r"--prior '.*/nope': .*/nope/prior\.safetensors does not exist"),
        (["--config", "BAD_JSON"], r"--config '.*bad\.json': not a readable JSON file \(Expecting property name"),
        (["--sample-guidance-scale", "inf"], "--sample-guidance-scale must be a finite number, got inf"),
        (["--resume-from-checkpoint", "/nonexistent"], "is not a checkpoint dir"),
        (["--output", "gs://bucket/run"], r"--output 'gs://bucket/run': a training run writes to a local folder"),
        (["--base-model", None], "--base-model is required"),
        (["--base-model", "MISSING"], r"--base-model '.*/nope': no such folder; give a diffusers model folder"),
        (["--base-model", "NOT_A_MODEL"], r"--base-model '.*' is not a diffusers model folder: it has no "
                                          "text_encoder/config.json, tokenizer/, vae/config.json, unet/config.json"),
    ],
)
def test_bad_flags_raise_clear_errors_and_create_nothing(demo_shards, base, tmp_path, extra, message):
    output = tmp_path / "bad"
    argv = _argv(str(demo_shards), base, output)
    (tmp_path / "bad.json").write_text("{not json")
    paths = {"MISSING": str(tmp_path / "nope"), "NOT_A_MODEL": str(demo_shards), "BAD_JSON": str(tmp_path / "bad.json")}
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        i = argv.index(flag) if flag in argv else None
        if i is not None:
            del argv[i : i + 2]
        if value is not None:
            argv += [flag, paths.get(value, value)]
    with pytest.raises(ValueError, match=message):
        run_train(argv)
    assert not output.exists()  # checked before --output is made: no empty run folder left behind


def test_a_prior_run_refuses_a_url_output_before_training(demo_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"--output 'memory://bucket/prior': a training run writes to a local folder"):
        run_train(["--data", str(demo_shards), "--config", "prior-tiny", "--output", "memory://bucket/prior",
                   "--max-train-steps", "2"])
    assert list(tmp_path.iterdir()) == []


def test_a_missing_base_model_that_looks_like_a_hub_id_is_named(demo_shards, base, tmp_path):
    argv = _argv(str(demo_shards), base, tmp_path / "bad")
    argv[argv.index("--base-model") + 1] = "nobody-here/no-such-model"  # offline (conftest): not in the cache either
    with pytest.raises(ValueError, match="'nobody-here/no-such-model': no such folder nor a Hub model in the local "
                                         "cache"):
        run_train(argv)


def test_resume_compares_path_flags_as_the_files_they_name(tmp_path, monkeypatch):
    """A resume from another directory, or with an absolute path, named the same data: it used to be refused."""
    import argparse

    from spatext.model.train_preflight import changed_flags

    (tmp_path / "a" / "data").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    saved = {"data": "data", "config": "latent-tiny", "prior": None, "seed": 0}
    monkeypatch.chdir(tmp_path / "b")
    same = argparse.Namespace(data=str(tmp_path / "a" / "data"), config="latent-tiny", prior=None, seed=0)
    assert changed_flags(same, saved, saved_cwd=str(tmp_path / "a")) == []
    assert changed_flags(argparse.Namespace(data="../a/data", config="latent-tiny", prior=None, seed=0), saved,
                         saved_cwd=str(tmp_path / "a")) == []
    (tmp_path / "b" / "data").mkdir()
    other = argparse.Namespace(data="data", config="latent-tiny", prior=None, seed=1)  # b/data, not a/data
    assert changed_flags(other, saved, saved_cwd=str(tmp_path / "a")) == [
        "--data 'data' (run: 'data')", "--seed 1 (run: 0)"]


def test_the_loss_log_records_the_learning_rate_each_step_used(demo_shards, base, tmp_path):
    """loss.csv logged the scheduler's next rate: with warm-up, step 1 (which trains at 0) showed the second step's."""
    from diffusers.optimization import get_scheduler

    out = tmp_path / "lr"
    assert run_train(_argv(str(demo_shards), base, out, "latent-tiny", 4, "--lr-scheduler", "linear",
                           "--lr-warmup-steps", "2", "--ema-decay", "0")) == 0
    with open(out / "logs" / "loss.csv") as f:
        logged = [float(r["lr"]) for r in csv.DictReader(f)]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)  # the reference schedule
    schedule = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=4)
    expected = []
    for _ in range(4):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert logged == pytest.approx(expected) and expected[0] == 0.0


def test_resume_from_checkpoint_takes_a_bare_checkpoint_name(tmp_path):
    """As in diffusers' training scripts, `checkpoint-N` names a checkpoint of --output; a wrong name lists them."""
    from argparse import Namespace

    from spatext.model.checkpoint import resolve_resume

    for step in (2, 4):
        (tmp_path / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"checkpoint-{step}" / STATE_FILE).write_text("{}")
    args = Namespace(output=str(tmp_path), resume_from_checkpoint="checkpoint-2")
    assert resolve_resume(args) == str(tmp_path / "checkpoints" / "checkpoint-2")
    args.resume_from_checkpoint = "checkpoint-3"
    with pytest.raises(ValueError, match=r"checkpoints holds checkpoint-2, checkpoint-4 \(a name there"):
        resolve_resume(args)
    args.resume_from_checkpoint = "latest"
    assert resolve_resume(args) == str(tmp_path / "checkpoints" / "checkpoint-4")


def test_latest_passes_over_a_checkpoint_cut_short_and_refuses_a_run_without_checkpoints(tmp_path, caplog):
    from argparse import Namespace

    from spatext.model.checkpoint import resolve_resume

    for step in (4, 8):
        (tmp_path / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-4" / STATE_FILE).write_text("{}")  # 8: saving cut short (no counters)
    args = Namespace(output=str(tmp_path), resume_from_checkpoint="latest")
    with caplog.at_level("WARNING", logger="spatext.model.checkpoint"):
        assert resolve_resume(args) == str(tmp_path / "checkpoints" / "checkpoint-4")
    assert "passing over checkpoint-8" in caplog.text
    args.resume_from_checkpoint = None  # checkpoints without run.json still make a run: no fresh start over them
    with pytest.raises(ValueError, match="already holds a run"):
        resolve_resume(args)
    shutil.rmtree(tmp_path / "checkpoints")
    (tmp_path / "run.json").write_text("{}")
    args.resume_from_checkpoint = "latest"
    with pytest.raises(ValueError, match=r"holds a run \(run.json\) but no checkpoint in .*starting over would"):
        resolve_resume(args)


def test_a_diverged_run_stops_before_saving_anything_of_it(four_rows, base, tmp_path):
    """A NaN loss at step 3 (lr 1e30): no checkpoint of NaN weights, the good one kept, a message naming it."""
    out = tmp_path / "nan"
    argv = _argv(four_rows, base, out, "latent-tiny", 6, "--checkpointing-steps", "1", "--checkpoints-total-limit",
                 "1", "--ema-decay", "0")
    argv[argv.index("--learning-rate") + 1] = "1e30"
    with pytest.raises(DivergedError, match=r"the loss is nan at step (\d+): training diverged \(with "
                                            r"--learning-rate 1e\+30\).*the last checkpoint is checkpoint-\d+.*"
                                            r"start a new run with a lower --learning-rate") as err:
        run_train(argv)
    step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    kept = os.listdir(out / "checkpoints")
    assert kept == [f"checkpoint-{step - 1}"] and step >= 2
    assert all(loss == loss for _, loss in _losses(out))  # no NaN row in loss.csv


def test_resume_refuses_data_that_changed_since_the_run_started(demo_shards, base, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_shards, data)
    out = tmp_path / "run"
    assert run_train(_argv(str(data), base, out, "latent-tiny", 2, "--checkpointing-steps", "2")) == 0
    extra = data / "shards" / "extra.parquet"
    shutil.copy(resolve_files(str(data))[0], extra)
    with pytest.raises(ValueError, match=r"--data .* changed since the run started: \d+ shard file\(s\) with \d+ rows, "
                                         r"then \d+ with \d+ \(added extra.parquet\)"):
        run_train(_argv(str(data), base, out, "latent-tiny", 4, "--checkpointing-steps", "2",
                        "--resume-from-checkpoint", "latest"))


def test_a_row_that_cannot_be_decoded_is_named_by_file_and_key(four_rows, tmp_path):
    source = resolve_files(four_rows)[0]
    table = pq.read_table(source)
    images = table.column("image").to_pylist()
    images[2] = images[2][: len(images[2]) // 3]  # a truncated JPEG
    broken = tmp_path / "shards"
    broken.mkdir()
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary())),
                   broken / "part.parquet")
    key = table.column("key")[2].as_py()
    dataset = ShardDataset(str(tmp_path), 32, shuffle_buffer=0)
    with pytest.raises(ValueError, match=rf"part\.parquet, row group 0, key '{key}': cannot use this row"):
        list(dataset)


def test_a_mid_epoch_resume_with_loader_workers_matches_an_uninterrupted_run(demo_shards, base, tmp_path):
    """With 2 loader workers an epoch is 4 batches (2 a worker); step 6 is batch 2 of epoch 1: the resume leaves one
    whole round of batches out undecoded; the weights and losses end as an uninterrupted run's."""
    extra = ("--dataloader-num-workers", "2", "--ema-decay", "0", "--checkpointing-steps", "6")
    out, straight = tmp_path / "resumed", tmp_path / "straight"
    assert run_train(_argv(str(demo_shards), base, out, "latent-tiny", 6, *extra)) == 0
    assert {k: _state(out, 6)[k] for k in ("epoch", "batch_in_epoch")} == {"epoch": 1, "batch_in_epoch": 2}
    assert run_train(_argv(str(demo_shards), base, out, "latent-tiny", 8, *extra,
                           "--resume-from-checkpoint", "latest")) == 0
    assert run_train(_argv(str(demo_shards), base, straight, "latent-tiny", 8, *extra)) == 0
    a, b = _weights(out), _weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(out) == _losses(straight)


def test_a_run_at_another_resolution_saves_a_pipeline_that_generates_at_it(four_rows, base, tmp_path):
    """--resolution 32 with pixel-tiny (16 px): the saved UNet's sample_size, the pipeline's default size (which the
    run's sample grids use too) and `spatext sample` without --height/--width are all 32 px."""
    out = tmp_path / "px32"
    assert run_train(_argv(four_rows, base, out, "pixel-tiny", 1, "--resolution", "32", "--ema-decay", "0",
                           "--checkpointing-steps", "0", "--sample-every", "1", "--num-validation", "1",
                           "--sample-steps", "2")) == 0
    assert json.loads((out / "pipeline" / "unet" / "config.json").read_text())["sample_size"] == 32
    assert SpaTextPipeline.from_pretrained(str(out / "pipeline")).default_size == (32, 32)
    scene = tmp_path / "scene.json"
    scene.write_text(json.dumps({"prompt": "a ball", "regions": [{"prompt": "a ball", "box": [0, 0, 0.5, 0.5]}]}))
    argv = ["--run", str(out), "--scene", str(scene), "--out", str(tmp_path / "x.png"), "--steps", "2"]
    assert sample.main(argv) == 0 and Image.open(tmp_path / "x.png").size == (32, 32)
