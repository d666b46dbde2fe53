"""``spatext sample``: generate images from a trained run with a global prompt and a scene, and draw the scene.

    spatext sample --run runs/tiny --prompt "a red ball on grass" --scene scene.json --out ball.png
    spatext sample --run runs/tiny --painted layout.png --colors colors.json --out ball.png --text-scale 7 --st-scale 3

``--guidance-scale`` alone uses the accelerated joint guidance (two passes); ``--text-scale`` + ``--st-scale`` use one
scale per condition (three passes). Next to the image(s) it writes ``OUT.scene.png``: the scene's masks coloured and
labelled with their local prompts, beside the result(s). The log says which weights of the run are random.

Also here: the pictures the trainer draws (``draw_scene``, ``tile_row``) and its validation scenes from shards.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import textwrap
from collections.abc import Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from spatext.cli import command_logging
from spatext.device import check_device
from spatext.model.data import ShardDataset
from spatext.model.pipeline import DEFAULT_GUIDANCE_SCALE, SpaTextPipeline, saved_pipeline_class
from spatext.model.scene import Scene, load_painted_scene, load_scene
from spatext.model.st import downsample_label_map
from spatext.pipeline.palette import region_colour
from spatext.pipeline.parquet_files import parquet_file
from spatext.pipeline.resize import resize_labels

logger = logging.getLogger(__name__)

LINE = 12  # legend line height in pixels


def draw_scene(scene: Scene, size: tuple[int, int], legend: bool = True) -> Image.Image:
    """The scene's masks at ``size`` (height, width), one colour per region (later on top), with a prompt legend."""
    height, width = size
    canvas = np.full((height, width, 3), 40, dtype=np.uint8)
    for i, region in enumerate(scene.regions):
        canvas[resize_labels(region.mask.astype(bool), (height, width))] = region_colour(i + 1)
    image = Image.fromarray(canvas)
    if not legend:
        return image
    lines = [(f"{i + 1}. {r.prompt}", region_colour(i + 1)) for i, r in enumerate(scene.regions)]
    lines = [(scene.prompt or "(no global prompt)", (255, 255, 255)), *lines]
    out = Image.new("RGB", (width, height + LINE * len(lines) + 4), (20, 20, 20))
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    chars = max(8, width // 6)
    for k, (text, colour) in enumerate(lines):
        draw.text((2, height + 2 + LINE * k), text[:chars], fill=colour)
    return out


def tile_row(images: Sequence[np.ndarray | Image.Image], tile: int = 128) -> Image.Image:
    """Images side by side, each scaled so that its width is ``tile`` (nearest when upscaling), top-aligned."""
    tiles = []
    for image in images:
        image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        scale = tile / image.width
        resample = Image.NEAREST if scale >= 1 else Image.BILINEAR
        tiles.append(image.convert("RGB").resize((tile, max(1, round(image.height * scale))), resample))
    row = Image.new("RGB", (tile * len(tiles) + 4 * (len(tiles) - 1), max(t.height for t in tiles)), "white")
    for k, t in enumerate(tiles):
        row.paste(t, (k * (tile + 4), 0))
    return row


def stack_rows(rows: Sequence[Image.Image]) -> Image.Image:
    """Rows one under another, left-aligned on white."""
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + 4 * (len(rows) - 1)), "white")
    top = 0
    for row in rows:
        grid.paste(row, (0, top))
        top += row.height + 4
    return grid


def with_title(image: Image.Image, lines: Sequence[str]) -> Image.Image:
    """``image`` under a dark strip of text lines (wrapped to its width), e.g. which weights made it."""
    chars = max(8, image.width // 6)
    wrapped = [piece for line in lines for piece in textwrap.wrap(line, chars) or [""]]
    out = Image.new("RGB", (image.width, image.height + LINE * len(wrapped) + 4), (20, 20, 20))
    draw = ImageDraw.Draw(out)
    for k, text in enumerate(wrapped):
        draw.text((2, 2 + LINE * k), text, fill=(255, 255, 255))
    out.paste(image, (0, LINE * len(wrapped) + 4))
    return out


@torch.no_grad()
def sample_grid(pipe: SpaTextPipeline, scenes: Sequence[tuple[Scene, np.ndarray]], steps: int, guidance_scale: float,
                seed: int, tile: int = 128, title: Sequence[str] = ()) -> Image.Image:
    """Per scene a row: real image | scene | what ``pipe`` generates for it (joint guidance, seed + row); ``title``
    lines above (the training loop names the step and any random-weight parts there)."""
    rows = []
    for i, (scene, image) in enumerate(scenes):
        out = pipe(scene=scene, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="np",
                   generator=torch.Generator(pipe.device).manual_seed(seed + i)).images
        generated = (out[0] * 255).round().astype(np.uint8)
        rows.append(tile_row([image, draw_scene(scene, (tile, tile)), generated], tile=tile))
    grid = stack_rows(rows)
    return with_title(grid, title) if title else grid


def _segments_by_key(files: list[str], keys: list[str]) -> dict[str, list[dict]]:
    """The stored ``segments`` of some keys, reading files in order until all are found."""
    found: dict[str, list[dict]] = {}
    for path in files:
        table = parquet_file(path, opener=lambda p: fsspec.open(p, "rb")).read(columns=["key", "segments"])
        table = table.filter(pc.is_in(table.column("key"), value_set=pa.array(keys, type=pa.string())))
        found.update((r["key"], r["segments"]) for r in table.to_pylist())
        if len(found) == len(keys):
            break
    return found


def _segment_labels(segments: list[dict], embeddings: np.ndarray, count: int) -> list[str]:
    """Labels of a sample's renumbered segments 1..count, found by their (exact float16) embedding in the row."""
    labels = []
    for j in range(count):
        emb = embeddings[j].astype(np.float16)
        match = next((s for s in segments if np.array_equal(np.asarray(s["embedding"], np.float16), emb)), {})
        labels.append(match.get("label") or f"segment {match.get('index', j + 1)}")
    return labels


def shard_scenes(dataset: ShardDataset, num: int, model_size: int) -> list[tuple[Scene, np.ndarray]]:
    """The first ``num`` shard samples as (scene, real image): segment masks as the model sees them (reduced to
    ``model_size`` and back, segments below one cell dropped), segment labels as local prompts, caption as prompt."""
    loader = ShardDataset(dataset.files, dataset.resolution, shuffle_buffer=0, rank=0, world_size=1,
                          max_segments=dataset.max_segments, resample_segments=dataset.resample_segments,
                          seed=dataset.seed)  # resampling as the run trains: needed when k_max > max_segments
    samples = list(itertools.islice(iter(loader), num))
    segments = _segments_by_key(loader.files, [s["key"] for s in samples])
    out = []
    for sample in samples:
        count = int(sample["num_segments"])
        labels = _segment_labels(segments.get(sample["key"], []), sample["segment_embeddings"].numpy(), count)
        small = downsample_label_map(sample["label_map"][None], (model_size, model_size), count)
        full = F.interpolate(small[None].float(), size=tuple(sample["label_map"].shape), mode="nearest")[0, 0]
        kept = [j for j in range(1, count + 1) if bool((small == j).any())]
        regions = [((full == j).numpy(), labels[j - 1]) for j in kept]
        image = ((sample["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
        out.append((Scene(sample["caption"], regions), image))
    return out


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags of ``spatext sample``."""
    p = argparse.ArgumentParser(prog="spatext sample", description="Generate images from a trained SpaText run",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", required=True, help="a run dir of `spatext train` (or a SpaTextPipeline dir)")
    p.add_argument("--prompt", default=None, help="global prompt; default: the scene file's 'prompt'")
    p.add_argument("--scene", default=None, help="scene JSON: regions with a local prompt and a box/polygon/mask; "
                   "with neither --scene nor --painted, --prompt alone is an empty scene")
    p.add_argument("--painted", default=None, help="colour-painted layout PNG (with --colors) instead of --scene")
    p.add_argument("--colors", default=None, help="JSON mapping the --painted colours to local prompts")
    p.add_argument("--out", required=True, help="output PNG; with --num-images N > 1: OUT-0.png ... OUT-{N-1}.png")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="joint guidance scale, two passes (default 7.5 when no scale is given)")
    p.add_argument("--negative-prompt", default=None,
                   help="text of the unconditional pass instead of the empty prompt (as in diffusers)")
    p.add_argument("--text-scale", type=float, default=None, help="per-condition guidance: global text scale")
    p.add_argument("--st-scale", type=float, default=None, help="per-condition guidance: ST scale (with --text-scale)")
    p.add_argument("--height", type=int, default=None, help="image height; default: the model's size")
    p.add_argument("--width", type=int, default=None, help="image width; default: the model's size")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--num-images", type=int, default=1, help="images for the prompt")
    p.add_argument("--device", default=None, help="torch device; default: cuda when available, else cpu")
    return p.parse_args(input_args)


def load_run(run: str, device: str) -> SpaTextPipeline:
    """The run's SpaTextPipeline (RUN/pipeline, or RUN itself), logging which of its weights are random."""
    directory = os.path.join(run, "pipeline") if os.path.isdir(os.path.join(run, "pipeline")) else run
    index = os.path.join(directory, "model_index.json")
    kind = saved_pipeline_class(directory)
    if kind is None:
        raise ValueError(f"--run {run!r} holds no pipeline (no pipeline/model_index.json); train one first")
    if kind != SpaTextPipeline.__name__:
        raise ValueError(f"--run {run!r} is not a SpaText run: {index} names a {kind} (e.g. a base model), not a "
                         f"{SpaTextPipeline.__name__}; pass the --output of `spatext train`")
    pipe = SpaTextPipeline.from_pretrained(directory).to(device)
    record = os.path.join(run, "run.json")
    random_init = []
    if os.path.isfile(record):
        with open(record, encoding="utf-8") as f:
            info = json.load(f)
        random_init = info.get("random_init", [])
        logger.info("run %s: config %s, step %s, %s weights", run, info.get("config", {}).get("name"),
                    info.get("global_step"), info.get("pipeline_weights", "trained"))
    label = pipe.local_encoder.config.pretrained
    if label.startswith("none") and "local_encoder" not in random_init:
        random_init.append("local_encoder")
    if random_init:
        logger.warning("random weights in this run: %s (pretrained: none (random init))", ", ".join(random_init))
    return pipe


def check_scene_flags(args: argparse.Namespace) -> None:
    """ValueError for scene flags that do not go together or name no file (checked before the model loads)."""
    if args.scene is not None and args.painted is not None:
        raise ValueError("give one of --scene and --painted (with --colors), not both")
    if args.scene is None and args.painted is None and args.colors is not None:
        raise ValueError("--colors goes with --painted (the colour-painted layout PNG)")
    if args.painted is not None and args.colors is None:
        raise ValueError("--painted needs --colors (the JSON mapping its colours to local prompts)")
    for flag, path in (("--scene", args.scene), ("--painted", args.painted), ("--colors", args.colors)):
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"{flag} {path!r}: no such file")


def read_scene(args: argparse.Namespace, size: tuple[int, int]) -> Scene:
    """The scene of ``--scene`` or ``--painted`` + ``--colors``, masks at ``size``; with neither, the empty scene
    (``--prompt`` alone: no region, ST all zeros, as ``pipe(prompt)`` does)."""
    check_scene_flags(args)
    if args.scene is None and args.painted is None:
        return Scene()
    if args.scene is not None:
        return load_scene(args.scene, size)
    return load_painted_scene(args.painted, args.colors, size)


def output_paths(out: str, count: int) -> list[str]:
    """OUT for one image; OUT-0.png ... for several; ``.png`` added where OUT has no extension. ValueError for an
    extension Pillow cannot write, before any image is generated."""
    stem, ext = os.path.splitext(out)
    if ext and ext.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {out!r}: Pillow writes no {ext!r} files; use e.g. .png or .jpg")
    if count == 1:
        return [stem + (ext or ".png")]
    return [f"{stem}-{i}{ext or '.png'}" for i in range(count)]


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Console entry (``spatext sample``): load the run, read the scene, generate, write images + the scene view."""
    command_logging()
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    for flag, value in (("--num-images", args.num_images), ("--steps", args.steps)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if (args.text_scale is None) != (args.st_scale is None):
        raise ValueError("--text-scale and --st-scale go together (one scale per condition); give both, or neither "
                         "for the joint --guidance-scale")
    if args.text_scale is not None and args.guidance_scale is not None:
        raise ValueError("--guidance-scale is the joint form, --text-scale + --st-scale the per-condition form: give "
                         "one form, not both")
    for name in ("guidance_scale", "text_scale", "st_scale"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    check_scene_flags(args)
    paths = output_paths(args.out, args.num_images)  # a bad --out fails now, not after generating
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    pipe = load_run(args.run, device)
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and (value < pipe.vae_scale_factor or value % pipe.vae_scale_factor):
            raise ValueError(f"{flag} must be a positive multiple of {pipe.vae_scale_factor} (the model's pixels per "
                             f"denoiser cell), got {value}")
    height, width = args.height or pipe.default_size[0], args.width or pipe.default_size[1]
    scene = read_scene(args, (height, width))
    prompt = args.prompt if args.prompt is not None else scene.prompt
    if not prompt or not prompt.strip():
        raise ValueError("no global prompt: pass --prompt or put 'prompt' in the scene file")
    scene = Scene(prompt, scene.regions, scene.source)
    per_condition = args.text_scale is not None or args.st_scale is not None
    images = pipe(
        prompt=prompt, scene=scene, height=height, width=width, num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale, text_guidance_scale=args.text_scale, st_guidance_scale=args.st_scale,
        num_images_per_prompt=args.num_images, generator=torch.Generator(device).manual_seed(args.seed),
        negative_prompt=args.negative_prompt,
    ).images
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for image, path in zip(images, paths, strict=True):
        image.save(path)
    view = os.path.splitext(args.out)[0] + ".scene.png"
    tile = max(256, width)
    tile_row([draw_scene(scene, (round(height * tile / width), tile)), *images], tile=tile).save(view)
    joint = DEFAULT_GUIDANCE_SCALE if args.guidance_scale is None else args.guidance_scale
    guidance = f"text {args.text_scale} / ST {args.st_scale}" if per_condition else f"joint {joint}"
    print(f"spatext sample: {len(paths)} image(s) -> {', '.join(paths)}; scene view -> {view} "
          f"({args.steps} steps, guidance {guidance}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
