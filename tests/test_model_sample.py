"""`spatext sample` end to end on a tiny trained run (latent-tiny, tiny base model, spatext-tiny CLIP, random weights),
and the pictures the trainer draws (scene view, validation scenes from shards)."""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import pytest
from accelerate.state import AcceleratorState
from PIL import Image

from spatext.model import sample, train
from spatext.model.data import ShardDataset
from spatext.model.scene import Scene
from spatext.model.tiny_base import write_tiny_base_model
from spatext.pipeline.palette import region_colour

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(demo_shards, tmp_path_factory) -> str:
    """A latent-tiny run trained for 2 steps."""
    root = tmp_path_factory.mktemp("sample")
    base = write_tiny_base_model(str(root / "base"))
    out = root / "run"
    try:
        assert train.main(["--data", str(demo_shards), "--config", "latent-tiny", "--base-model", base,
                           "--output", str(out), "--max-train-steps", "2", "--train-batch-size", "2"]) == 0
    finally:
        AcceleratorState._reset_state()
    return str(out)


@pytest.fixture
def scene_files(tmp_path) -> dict[str, str]:
    """A scene JSON (a box and a polygon) and the same layout painted, with its colour mapping."""
    scene = {"prompt": "a red ball on grass", "regions": [
        {"prompt": "green grass", "box": [0, 0.5, 1, 1]},
        {"prompt": "a red ball", "polygon": [[0.1, 0.1], [0.5, 0.1], [0.5, 0.5], [0.1, 0.5]]},
    ]}
    (tmp_path / "scene.json").write_text(json.dumps(scene))
    painted = np.zeros((32, 32, 3), np.uint8)
    painted[16:] = (0, 255, 0)
    painted[3:16, 3:16] = (255, 0, 0)
    Image.fromarray(painted).save(tmp_path / "painted.png")
    colors = {"prompt": "a red ball on grass", "colors": {"#00ff00": "green grass", "#ff0000": "a red ball"}}
    (tmp_path / "colors.json").write_text(json.dumps(colors))
    return {name: str(tmp_path / name) for name in ("scene.json", "painted.png", "colors.json")}


def _sample(run: str, out, *extra: str) -> np.ndarray:
    assert sample.main(["--run", run, "--out", str(out), "--steps", "3", *extra]) == 0
    return np.asarray(Image.open(out))


def test_sample_writes_the_image_and_the_scene_view(run, scene_files, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="spatext.model.sample"):
        image = _sample(run, tmp_path / "a.png", "--scene", scene_files["scene.json"], "--prompt", "a ball")
    assert image.shape == (32, 32, 3)
    assert "random weights in this run: local_encoder" in caplog.text
    view = Image.open(tmp_path / "a.scene.png")
    assert view.width > 2 * 256 - 1 and view.height >= 256  # scene tile + image tile, each >= 256 wide
    again = _sample(run, tmp_path / "b.png", "--scene", scene_files["scene.json"], "--prompt", "a ball")
    assert np.array_equal(image, again)  # same seed, same image
    other = _sample(run, tmp_path / "c.png", "--scene", scene_files["scene.json"], "--prompt", "a ball", "--seed", "1")
    assert not np.array_equal(image, other)


def test_painted_scene_per_condition_guidance_and_several_images(run, scene_files, tmp_path):
    out = tmp_path / "p.png"
    assert sample.main(["--run", run, "--out", str(out), "--steps", "2", "--painted", scene_files["painted.png"],
                        "--colors", scene_files["colors.json"], "--text-scale", "5", "--st-scale", "2",
                        "--num-images", "2"]) == 0  # the prompt comes from the colour mapping
    first, second = (np.asarray(Image.open(tmp_path / f"p-{i}.png")) for i in (0, 1))
    assert first.shape == second.shape == (32, 32, 3) and not np.array_equal(first, second)
    assert (tmp_path / "p.scene.png").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scene", "S", "--painted", "P", "--colors", "C"], "one of --scene and --painted .*, not both"),
        (["--colors", "C", "--prompt", "p"], "--colors goes with --painted"),
        ([], "no global prompt"),
        (["--painted", "P"], "--painted needs --colors"),
        (["--scene", "NOPROMPT"], "no global prompt"),
        (["--scene", "S", "--num-images", "0"], r"^--num-images must be >= 1, got 0$"),
        (["--scene", "S", "--steps", "0"], r"^--steps must be >= 1, got 0$"),
        (["--scene", "S", "--text-scale", "3"], r"^--text-scale and --st-scale go together"),
        (["--scene", "S", "--st-scale", "3"], r"^--text-scale and --st-scale go together"),
        (["--scene", "S", "--guidance-scale", "nan"], "--guidance-scale must be a finite number, got nan"),
        (["--scene", "S", "--text-scale", "inf", "--st-scale", "1"], "--text-scale must be a finite number"),
        (["--scene", "S", "--device", "tpu"], r"--device 'tpu' is not a torch device"),
        (["--scene", "S", "--out", "OUT.webpx"], r"Pillow writes no '.webpx' files"),
        (["--scene", "S", "--guidance-scale", "3", "--text-scale", "3", "--st-scale", "1"], "one form, not both"),
        (["--scene", "S", "--height", "50"], r"^--height must be a positive multiple of \d+ .*, got 50"),
        (["--scene", "S", "--width", "0"], r"^--width must be a positive multiple"),
    ],
)
def test_bad_sample_flags_raise_clear_errors(run, scene_files, tmp_path, extra, message):
    no_prompt = tmp_path / "np.json"
    no_prompt.write_text(json.dumps({"regions": [{"prompt": "a ball", "box": [0, 0, 0.5, 0.5]}]}))
    names = {"S": scene_files["scene.json"], "P": scene_files["painted.png"], "C": scene_files["colors.json"],
             "NOPROMPT": str(no_prompt)}
    with pytest.raises(ValueError, match=message):
        sample.main(["--run", run, "--out", str(tmp_path / "x.png"), "--steps", "1",
                     *[names.get(a, a) for a in extra]])


def test_a_dir_without_a_pipeline_is_refused(tmp_path, scene_files):
    with pytest.raises(ValueError, match="holds no pipeline"):
        sample.main(["--run", str(tmp_path), "--out", str(tmp_path / "x.png"), "--scene", scene_files["scene.json"]])


def test_a_folder_of_another_pipeline_is_not_taken_for_a_run(run, tmp_path, scene_files):
    base = os.path.join(os.path.dirname(run), "base")  # the tiny base model the run was trained from
    with pytest.raises(ValueError, match=r"is not a SpaText run: .*model_index.json names a StableDiffusionPipeline"):
        sample.main(["--run", base, "--out", str(tmp_path / "x.png"), "--scene", scene_files["scene.json"]])


def test_a_region_lost_at_the_model_resolution_names_the_scene_file(run, tmp_path):
    path = tmp_path / "dot.json"  # one pixel at the 32 px image size, nothing at the model's 8 x 8
    path.write_text(json.dumps({"prompt": "a sky", "regions": [{"prompt": "a bird", "box": [0.1, 0.1, 0.13, 0.13]}]}))
    message = rf"^{re.escape(str(path))}: regions\[0\] \('a bird'\) has no pixel at the model's resolution 8x8"
    with pytest.raises(ValueError, match=message):
        sample.main(["--run", run, "--out", str(tmp_path / "x.png"), "--steps", "1", "--scene", str(path)])


def test_shard_scenes_use_segment_labels_and_the_model_resolution(demo_shards):
    dataset = ShardDataset(str(demo_shards), 32, shuffle_buffer=0)
    scenes = sample.shard_scenes(dataset, 3, model_size=8)
    assert len(scenes) == 3
    for scene, image in scenes:
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and scene.prompt
        assert scene.regions and all(not r.prompt.startswith("segment ") for r in scene.regions)  # real labels
        for region in scene.regions:  # whole 4x4 cells of the 8x8 model grid
            cells = region.mask.reshape(8, 4, 8, 4)
            assert (cells.all(axis=(1, 3)) == cells.any(axis=(1, 3))).all()
    assert scenes[0][0].regions[0].prompt == "sand"


def test_shard_scenes_resample_segments_as_the_run_does(demo_shards):
    """A run with --resample-segments may keep fewer segments than the shards' k_max: its sample grids must too."""
    dataset = ShardDataset(str(demo_shards), 32, shuffle_buffer=0, max_segments=2, resample_segments=True)
    assert int(dataset.metadata["k_max"]) > 2
    scenes = sample.shard_scenes(dataset, 4, model_size=8)
    assert len(scenes) == 4 and all(1 <= len(scene.regions) <= 2 for scene, _ in scenes)
    again = sample.shard_scenes(dataset, 4, model_size=8)  # the same regions at every grid of the run
    assert [[r.prompt for r in s.regions] for s, _ in again] == [[r.prompt for r in s.regions] for s, _ in scenes]


def test_draw_scene_colours_each_region_and_lists_the_prompts():
    top = np.zeros((8, 8), bool)
    top[:4] = True
    scene = Scene("two halves", [(top, "sky"), (~top, "sea")])
    plain = np.asarray(sample.draw_scene(scene, (8, 8), legend=False))
    assert tuple(plain[0, 0]) == region_colour(1) and tuple(plain[7, 7]) == region_colour(2)
    with_legend = sample.draw_scene(scene, (64, 64))
    assert with_legend.size == (64, 64 + 3 * sample.LINE + 4)


def test_output_paths_add_png_where_out_has_no_extension():
    assert sample.output_paths("out/a", 1) == ["out/a.png"]
    assert sample.output_paths("out/a.jpg", 1) == ["out/a.jpg"]
    assert sample.output_paths("out/a", 2) == ["out/a-0.png", "out/a-1.png"]
    with pytest.raises(ValueError, match="Pillow writes no '.xyz' files"):
        sample.output_paths("out/a.xyz", 2)


def test_a_prompt_alone_samples_an_empty_scene(run, tmp_path):
    """`pipe(prompt)` works without a scene; the CLI used to demand --scene or --painted."""
    image = _sample(run, tmp_path / "p.png", "--prompt", "a red ball on grass")
    assert image.shape[2] == 3 and (tmp_path / "p.scene.png").is_file()


def test_scene_flags_are_checked_before_the_model_loads(scene_files, tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "load_run", lambda *a: pytest.fail("the model loaded before the flags were checked"))
    base = ["--run", str(tmp_path), "--out", str(tmp_path / "x.png")]
    for extra, message in (
        (["--scene", scene_files["scene.json"], "--painted", scene_files["painted.png"], "--colors",
          scene_files["colors.json"]], "not both"),
        (["--painted", scene_files["painted.png"]], "--painted needs --colors"),
        (["--scene", str(tmp_path / "missing.json")], r"--scene '.*missing.json': no such file"),
    ):
        with pytest.raises(ValueError, match=message):
            sample.main([*base, *extra])
