"""`spatext eval generate`: baselines (concat prompt, ntlb attention guidance), seeding, and the generations folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spatext.eval import cli
from spatext.eval.baselines import (
    AttentionRecorder,
    concat_prompt,
    fit_prompt,
    load_base_pipeline,
    optimise_latents,
    recording_attention,
    token_positions,
)
from spatext.eval.benchmark_set import BenchmarkSpec, file_stem, load_benchmark, make_benchmark
from spatext.eval.generate import GenerateSpec, base_weights_label, read_generations, sample_seed
from spatext.eval.masks import parse_perturb
from spatext.model.pipeline import LocalPromptEncoder, PriorModel, build_pipeline
from spatext.model.tiny_base import WEIGHTS_MARKER, read_weights_marker, write_tiny_base_model
from spatext.pipeline.clip import RANDOM_INIT_LABEL, ClipSpec, load_clip

STEPS = ["--steps", "2", "--guidance", "3.0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench(demo_shards, tmp_path_factory) -> Path:
    """A 2-sample `few` benchmark of the demo corpus."""
    out = tmp_path_factory.mktemp("bench") / "few"
    make_benchmark(BenchmarkSpec(shards=str(demo_shards), out=str(out), protocol="few", num=2, seed=0))
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """The tiny random SD-like base model, written in diffusers layout."""
    return write_tiny_base_model(str(tmp_path_factory.mktemp("base") / "tiny-sd"))


def test_concat_prompt_and_token_positions(base) -> None:
    assert concat_prompt("a street", ["car", "blue sky"]) == "a street, car, blue sky"
    assert concat_prompt("a street", []) == "a street"
    tokenizer = load_base_pipeline(base).tokenizer
    prompt = concat_prompt("a car on a street", ["car", "blue sky"])
    positions = token_positions(tokenizer, "a car on a street", ["car", "blue sky"])
    ids = tokenizer(prompt).input_ids
    for local, where in zip(["car", "blue sky"], positions, strict=True):
        assert [ids[i] for i in where] == tokenizer(local, add_special_tokens=False).input_ids
    assert positions[0][0] > 4  # the local "car", not the one inside the global prompt
    long = "a street " * 40
    fitted = fit_prompt(tokenizer, long, ["car", "blue sky"])
    assert long.startswith(fitted) and len(tokenizer(concat_prompt(fitted, ["car", "blue sky"])).input_ids) <= 77
    assert fit_prompt(tokenizer, "a street", ["car"]) == "a street"
    with pytest.raises(ValueError, match="ntlb"):
        token_positions(tokenizer, "a street " * 40, ["zebra"])  # cut off by the 77-token limit


def test_ntlb_loss_decreases_and_processors_are_restored(base) -> None:
    """Gradient steps on the latents move the local prompts' attention into their masks (tiny random model)."""
    pipe = load_base_pipeline(base)
    before = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    prompt = concat_prompt("a photo", ["dog", "sky"])
    positions = token_positions(pipe.tokenizer, "a photo", ["dog", "sky"])
    cond, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    masks = torch.zeros(2, 32, 32)
    masks[0, :, :16], masks[1, :, 16:] = 1, 1
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    with torch.no_grad():
        _, losses = optimise_latents(pipe, latents, t, cond, masks, positions, step_size=50.0, iterations=6)
    assert len(losses) == 7 and all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 1e-4
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == before
    with pytest.raises(RuntimeError), recording_attention(pipe.unet):
        assert all(isinstance(p, AttentionRecorder) for p in pipe.unet.attn_processors.values())
        raise RuntimeError("boom")
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == before


def test_ntlb_guides_with_the_model_packages_joint_cfg(base, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each denoising step of ``sample_ntlb`` combines its two passes with ``spatext.model.guidance.joint_cfg`` at the
    --guidance scale (its one home), and the image leaves through ``to_uint8``."""
    from spatext.eval import baselines
    from spatext.model.guidance import joint_cfg

    calls: list[float] = []

    def spy(noise_uncond: torch.Tensor, noise_joint: torch.Tensor, scale: float) -> torch.Tensor:
        calls.append(scale)
        return joint_cfg(noise_uncond, noise_joint, scale)

    converted: list[np.ndarray] = []
    monkeypatch.setattr(baselines, "joint_cfg", spy)
    monkeypatch.setattr(baselines, "to_uint8", lambda x: converted.append(x) or (x * 0).astype(np.uint8))
    pipe = load_base_pipeline(base)
    masks = np.zeros(baselines.model_size(pipe), dtype=np.uint8)
    masks[:, : masks.shape[1] // 2] = 1
    settings = baselines.SampleSettings(steps=3, guidance=2.5, ntlb_steps=1)
    image, _ = baselines.sample_ntlb(pipe, "a photo", masks, ["dog"], settings, torch.Generator().manual_seed(0))
    assert calls == [2.5] * 3
    assert len(converted) == 1 and image.dtype == np.uint8 and image.shape == (*masks.shape, 3)


def test_sample_seed_depends_on_seed_and_key_only() -> None:
    assert sample_seed(0, "a") == sample_seed(0, "a") != sample_seed(0, "b")
    assert sample_seed(0, "a") != sample_seed(1, "a")
    assert 0 <= sample_seed(5, "x") < 2**63


def test_spec_errors_name_the_flag(bench) -> None:
    with pytest.raises(ValueError, match="--method"):
        GenerateSpec(benchmark=str(bench), method="nope", out="x")
    with pytest.raises(ValueError, match="--base-model"):
        GenerateSpec(benchmark=str(bench), method="ntlb", out="x")
    with pytest.raises(ValueError, match="--run"):
        GenerateSpec(benchmark=str(bench), method="spatext", out="x")


def _check_folder(folder: Path, bench: Path, method: str) -> dict:
    """generation.json is complete and every image is at its reference size."""
    info = read_generations(str(folder))
    samples = load_benchmark(str(bench))
    assert info["method"] == method and info["benchmark"]["num_samples"] == len(samples) == 2
    assert len(info["benchmark"]["sha256"]) == 64
    assert (info["settings"] is None) == (method == "reference")  # reference samples nothing: no sampler settings
    for sample in samples:
        assert info["images"][sample.key] == f"images/{file_stem(sample.key)}.png"
        with Image.open(folder / info["images"][sample.key]) as image:
            assert image.mode == "RGB" and image.size == sample.reference.shape[1::-1]
    return info


def test_generate_reference_and_baselines_through_the_cli(bench, base, tmp_path) -> None:
    assert cli.main(["generate", "--benchmark", str(bench), "--method", "reference", "--out",
                     str(tmp_path / "reference")]) == 0
    info = _check_folder(tmp_path / "reference", bench, "reference")
    sample = load_benchmark(str(bench))[0]
    with Image.open(tmp_path / "reference" / info["images"][sample.key]) as image:
        np.testing.assert_array_equal(np.array(image), sample.reference)
    for method in ("global-only", "concat", "ntlb"):
        out = tmp_path / method
        argv = ["generate", "--benchmark", str(bench), "--method", method, "--base-model", base, "--out", str(out),
                *STEPS, "--ntlb-steps", "1"]
        assert cli.main(argv) == 0
        info = _check_folder(out, bench, method)
        # No --weights-label: the tiny base model's own marker labels its random weights.
        assert info["model"]["weights"] == RANDOM_INIT_LABEL and info["model"]["generated_size"] == [32, 32]
        assert info["model"]["weights_marker"]["seed"] == 0
        assert info["concat_rule"] is (None if method == "global-only" else info["concat_rule"])
    # Same seed and key: the same image, whatever else was generated (concat and ntlb with 0 ntlb steps agree).
    argv = ["generate", "--benchmark", str(bench), "--method", "ntlb", "--base-model", base, *STEPS,
            "--ntlb-steps", "0", "--out", str(tmp_path / "ntlb0")]
    assert cli.main(argv) == 0
    name = info["images"][sample.key]
    with Image.open(tmp_path / "concat" / name) as a, Image.open(tmp_path / "ntlb0" / name) as b:
        assert np.abs(np.array(a).astype(int) - np.array(b).astype(int)).max() <= 2
    # An existing folder is refused without --overwrite (exit status 2, named flag).
    assert cli.main(["generate", "--benchmark", str(bench), "--method", "reference", "--out",
                     str(tmp_path / "reference")]) == 2


def test_generate_with_perturbed_masks_records_it(bench, base, tmp_path) -> None:
    argv = ["generate", "--benchmark", str(bench), "--method", "ntlb", "--base-model", base, *STEPS,
            "--ntlb-steps", "1", "--mask-perturb", "dilate:3", "--out", str(tmp_path / "ntlb-dilated")]
    assert cli.main(argv) == 0
    assert _check_folder(tmp_path / "ntlb-dilated", bench, "ntlb")["mask_perturb"] == "dilate:3"
    for method in ("global-only", "concat"):  # no masks: perturbing would only drop local prompts
        with pytest.raises(ValueError, match=f"--mask-perturb does not apply to --method {method}: it uses no masks"):
            GenerateSpec(benchmark=str(bench), method=method, out="o", base_model=base,
                         mask_perturb=parse_perturb("erode:2"))


def test_ntlb_optimises_the_first_half_of_the_steps_by_default() -> None:
    from spatext.eval.baselines import SampleSettings

    assert SampleSettings(steps=10).optimised_steps == 5 and SampleSettings(steps=50).optimised_steps == 25
    assert SampleSettings(steps=10, ntlb_steps=3).optimised_steps == 3
    assert SampleSettings(steps=10, ntlb_steps=40).optimised_steps == 10


def test_generate_spatext_run(bench, base, tmp_path) -> None:
    """A SpaText pipeline built from the tiny base (random ST weights), saved as a run, generated through the CLI."""
    clip = load_clip(ClipSpec(model="spatext-tiny", pretrained="none"))
    prior = PriorModel(prior_config={"embed_dim": 64, "hidden_dim": 32, "num_layers": 1})
    pipe = build_pipeline("latent-tiny", base, LocalPromptEncoder.from_clip(clip), prior.eval())
    pipe.save_pretrained(str(tmp_path / "run" / "pipeline"), safe_serialization=True)
    out = tmp_path / "spatext"
    assert cli.main(["generate", "--benchmark", str(bench), "--method", "spatext", "--run", str(tmp_path / "run"),
                     "--out", str(out), "--steps", "1"]) == 0
    info = _check_folder(out, bench, "spatext")
    assert info["model"]["weights"] == "unknown (no run.json: provenance not given)"
    assert info["model"]["generated_size"] == [32, 32]


def test_spatext_leaves_out_regions_smaller_than_a_latent_cell_and_records_them(bench, base, tmp_path) -> None:
    """The `all` protocol's tiny segments stopped `generate --method spatext` ("no pixel at the model's resolution")."""
    import dataclasses

    from spatext.eval.generate import _spatext_generator
    from spatext.model.scene import Scene

    clip = load_clip(ClipSpec(model="spatext-tiny", pretrained="none"))
    prior = PriorModel(prior_config={"embed_dim": 64, "hidden_dim": 32, "num_layers": 1})
    pipe = build_pipeline("latent-tiny", base, LocalPromptEncoder.from_clip(clip), prior.eval())
    pipe.save_pretrained(str(tmp_path / "run" / "pipeline"), safe_serialization=True)
    sample = load_benchmark(str(bench))[0]
    masks = np.zeros_like(sample.masks)
    masks[: masks.shape[0] // 2] = 1  # region 1: the top half
    masks[-1, -1] = 2  # region 2 (if any): one pixel, less than a latent cell
    regions = (dataclasses.replace(sample.regions[0], index=1), dataclasses.replace(sample.regions[0], index=2,
                                                                                     prompt="a dot"))
    tiny = dataclasses.replace(sample, masks=masks, regions=regions)
    scene = Scene(tiny.prompt, [(masks == r.index, r.prompt) for r in regions])
    assert pipe.visible_regions(scene, (32, 32)) == [True, False]
    spec = GenerateSpec(benchmark=str(bench), method="spatext", out=str(tmp_path / "g"), run=str(tmp_path / "run"),
                        settings=dataclasses.replace(GenerateSpec.settings, steps=1))
    one, model = _spatext_generator(spec)
    image = one(tiny, torch.Generator().manual_seed(0))
    assert image.dtype == np.uint8 and image.ndim == 3
    assert model["regions_dropped"] == {tiny.key: [2]}
    with pytest.raises(ValueError, match="has no pixel at"):  # what the pipeline alone does
        pipe(tiny.prompt, scene=scene, height=32, width=32, num_inference_steps=1)


def test_tiny_base_marker_labels_the_weights(base, tmp_path) -> None:
    """The tiny base model says its weights are random; generate's label follows it unless told otherwise."""
    marker = read_weights_marker(base)
    assert marker["pretrained"] == RANDOM_INIT_LABEL and marker["config"] == "latent-tiny"
    assert base_weights_label(base, None) == (RANDOM_INIT_LABEL, marker)
    assert base_weights_label(base, "fine-tuned here") == ("fine-tuned here", marker)  # explicit label wins
    plain = tmp_path / "plain"
    plain.mkdir()
    label, none = base_weights_label(str(plain), None)
    assert none is None and "provenance not given" in label
    (plain / WEIGHTS_MARKER).write_text("[1, 2]")
    with pytest.raises(ValueError, match=WEIGHTS_MARKER):
        base_weights_label(str(plain), None)


def _generate_reference(bench: Path, out: Path, *extra: str) -> int:
    """``spatext eval generate --method reference`` through the CLI; its exit status."""
    return cli.main(["generate", "--benchmark", str(bench), "--method", "reference", "--out", str(out), *extra])


def test_overwrite_replaces_only_generations_folders(bench, tmp_path, capsys) -> None:
    """--overwrite never deletes the benchmark, a folder holding it, or a folder generate did not write."""
    victim = tmp_path / "victim"
    shutil.copytree(bench, victim)
    before = sorted(p.relative_to(victim) for p in victim.rglob("*"))
    for out in (victim, tmp_path):  # the benchmark itself, and a folder that contains it
        capsys.readouterr()
        assert _generate_reference(victim, out, "--overwrite") == 2
        error = next(line for line in capsys.readouterr().err.splitlines() if "error:" in line)
        assert "--out" in error and "--benchmark" in error and "refusing" in error
        assert sorted(p.relative_to(victim) for p in victim.rglob("*")) == before
    load_benchmark(str(victim))  # still whole
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert _generate_reference(bench, mine, "--overwrite") == 2 and (mine / "notes.txt").read_text() == "keep me"
    # A generations folder, complete or interrupted (images/ of PNGs, no generation.json yet), is replaced.
    gen = tmp_path / "gen"
    assert _generate_reference(bench, gen) == 0 and _generate_reference(bench, gen, "--overwrite") == 0
    (gen / "generation.json").unlink()
    assert _generate_reference(bench, gen, "--overwrite") == 0
    assert read_generations(str(gen))["method"] == "reference"
    info = json.loads((gen / "generation.json").read_text())
    info["format"] = "something-else"
    (gen / "generation.json").write_text(json.dumps(info))
    assert _generate_reference(bench, gen, "--overwrite") == 2 and (gen / "images").is_dir()


def test_a_run_or_base_model_of_the_wrong_kind_is_one_clear_line(bench, base, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "pipeline").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    cases = [(["--method", "spatext", "--run", str(tmp_path)], "holds no pipeline (no pipeline/model_index.json)"),
             (["--method", "spatext", "--run", base], "is not a SpaText run"),
             (["--method", "concat", "--base-model", str(run)], "is a SpaText run (spatext train --output)"),
             (["--method", "concat", "--base-model", str(tmp_path)], "holds no model_index.json")]
    for extra, message in cases:
        argv = ["generate", "--benchmark", str(bench), "--out", str(tmp_path / "gen"), "--steps", "1", *extra]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "(set SPATEXT_DEBUG=1 to see the traceback)" in err, err
