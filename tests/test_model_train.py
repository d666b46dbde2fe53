"""`spatext train`: the real script on tiny configs (latent-tiny + the tiny base model, pixel-tiny) and demo shards.

Runs call `train.main(argv)` in-process and check what it wrote: the loss curve, checkpoints, the pipeline, run.json,
sample grids. Weights are random (tiny base model, spatext-tiny CLIP); what is tested is the machinery.
"""

from __future__ import annotations

import csv
import json
import os
import statistics

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
from accelerate.state import AcceleratorState
from accelerate.utils import load as accelerate_load
from PIL import Image

from spatext.model import train
from spatext.model.checkpoint import STATE_FILE
from spatext.model.config import get_config
from spatext.model.data import resolve_files
from spatext.model.denoiser import build_denoiser, predict
from spatext.model.pipeline import SpaTextPipeline
from spatext.model.tiny_base import write_tiny_base_model

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
    assert record["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    pipe = SpaTextPipeline.from_pretrained(os.path.join(run, "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt="a triangle on sand", scene=[(torch.ones(32, 32), "sand")], num_inference_steps=2).images[0]
    assert image.size == (32, 32)
    pixel = SpaTextPipeline.from_pretrained(os.path.join(overfit["pixel-tiny"], "pipeline"))
    assert pixel.vae is None and "unet" in _record(overfit["pixel-tiny"])["random_init"]


def _weights(run) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(os.path.join(run, "pipeline", "unet", "diffusion_pytorch_model.safetensors"))


def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(demo_shards, base, tmp_path):
    extra = ("--checkpointing-steps", "2", "--sample-every", "2", "--num-validation", "2", "--sample-steps", "2")
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    assert run_train(_argv(str(demo_shards), base, resumed, "latent-tiny", 4, *extra)) == 0
    assert _record(resumed)["global_step"] == 4
    with pytest.raises(ValueError, match="already holds a run"):
        run_train(_argv(str(demo_shards), base, resumed, "latent-tiny", 6, *extra))
    assert run_train(_argv(str(demo_shards), base, resumed, "latent-tiny", 6, *extra,
                           "--resume-from-checkpoint", "latest")) == 0
    record = _record(resumed)
    assert record["global_step"] == 6 and record["status"] == "finished" and record["epoch"] == 1  # 3 batches/epoch
    assert [step for step, _ in _losses(resumed)] == [1, 2, 3, 4, 5, 6]
    names = sorted(os.listdir(resumed / "checkpoints"))
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    state = json.loads((resumed / "checkpoints" / "checkpoint-6" / STATE_FILE).read_text())
    assert state == {"global_step": 6, "epoch": 1, "batch_in_epoch": 3, "micro_step": 6}
    checkpoint = resumed / "checkpoints" / "checkpoint-6"
    assert sorted(os.listdir(checkpoint)) == ["ema.safetensors", "model.safetensors", "optimizer.bin",
                                              "random_states_0.pkl", "scheduler.bin", STATE_FILE]
    for name in ("optimizer.bin", "scheduler.bin"):  # nothing in a checkpoint needs unsafe unpickling
        torch.load(checkpoint / name, weights_only=True)
    assert accelerate_load(checkpoint / "random_states_0.pkl")["step"] == 6  # weights_only + numpy allowlist
    assert sorted(os.listdir(resumed / "samples")) == ["step-2.png", "step-4.png", "step-6.png"]
    assert Image.open(resumed / "samples" / "step-6.png").size[1] > 2 * 128  # two validation rows
    # an uninterrupted 6-step run ends with the same weights, EMA included: the checkpoint restored everything
    # (decoding in the loop itself instead of 2 threads: the same batches in the same order)
    assert run_train(_argv(str(demo_shards), base, straight, "latent-tiny", 6, *extra, "--decode-threads", "1")) == 0
    a, b = _weights(resumed), _weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(resumed) == _losses(straight)


def test_gradient_accumulation_counts_optimizer_steps(four_rows, base, tmp_path):
    out = tmp_path / "accum"
    argv = _argv(four_rows, base, out, "pixel-tiny", 2, "--gradient-accumulation-steps", "2", "--ema-decay", "0",
                 "--train-batch-size", "2")  # the last --train-batch-size wins
    assert run_train(argv) == 0
    state = json.loads((out / "checkpoints" / "checkpoint-2" / STATE_FILE).read_text())
    assert state["global_step"] == 2 and state["micro_step"] == 4
    assert len(_losses(out)) == 2


def test_prior_config_trains_the_prior_and_a_denoiser_run_takes_it(demo_shards, base, tmp_path):
    prior_run = tmp_path / "prior"
    assert run_train(["--data", str(demo_shards), "--config", "prior-tiny", "--output", str(prior_run),
                      "--max-train-steps", "5"]) == 0
    assert (prior_run / "prior.safetensors").is_file() and _record(prior_run)["kind"] == "prior"
    out = tmp_path / "with-prior"
    assert run_train(_argv(str(demo_shards), base, out, "latent-tiny", 1, "--prior", str(prior_run))) == 0
    assert _record(out)["lineage"]["prior"] == str(prior_run)
    assert "prior (untrained: identity)" not in _record(out)["random_init"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--config", "latent-sd15"], "embed_dim=768 .* D=64"),
        (["--clip-model", "ViT-B-32"], "differs from the shards' CLIP"),
        (["--p-drop-text", "1.5"], "--p-drop-text must be in"),
        (["--ema-decay", "1"], "--ema-decay must be in"),
        (["--decode-threads", "0"], "--decode-threads must be >= 1"),
        (["--resume-from-checkpoint", "/nonexistent"], "is not a checkpoint dir"),
        (["--base-model", None], "--base-model is required"),
    ],
)
def test_bad_flags_raise_clear_errors(demo_shards, base, tmp_path, extra, message):
    argv = _argv(str(demo_shards), base, tmp_path / "bad")
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        i = argv.index(flag) if flag in argv else None
        if i is not None:
            del argv[i : i + 2]
        if value is not None:
            argv += [flag, value]
    with pytest.raises(ValueError, match=message):
        run_train(argv)
