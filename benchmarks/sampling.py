"""Sampling time: plain two-pass CFG vs SpaText's accelerated joint guidance vs per-condition guidance, one run.

The modes, same UNet body and size, same scheduler (DDIM), same number of steps, same image size:
  plain          diffusers' own ``StableDiffusionPipeline`` with the base UNet (latent channels in, no ST), global
                 prompt only, classifier-free guidance: 2 passes (uncond, text) batched into one forward per step;
  joint          ``SpaTextPipeline`` with ``guidance_scale`` (ε(∅) + s·(ε(text, ST) − ε(∅))): 2 passes batched, plus
                 the once-per-image work SpaText adds (local prompts through CLIP text + prior, rasterising, ST);
  per-condition  ``SpaTextPipeline`` with ``text_guidance_scale`` + ``st_guidance_scale``: 3 passes batched;
  *-concat       the same two SpaText modes the way they ran before conv_in's ST term was cached: [sample; ST] through
                 the full conv_in at every step (reference modes, run by default; ``--modes`` picks the modes).
The SpaText UNet is the plain UNet's copy with D input channels added to ``conv_in``. Every call ends at the latents
(``output_type="latent"``; the VAE decode, identical in all modes, is left out). Text encoder, tokenizer and VAE come
from ``write_tiny_base_model`` (a 2-layer text encoder of the right width); the local encoder is the open_clip text
tower of a CLIP with that D, random weights. Every (images per call, mode) pair gets a warm-up call, then ``--repeats``
rounds of interleaved calls in rotating order; times are medians (also best of the rounds, which noise cannot
lower). The once-per-call work SpaText adds (local prompts -> CLIP text -> prior -> ST) is timed on its own in the
same rounds and reported as a share of a plain call.

Default shape (CPU): the SD-1.x UNet layout at half width on 32x32 latents (256 px), D=384 (ViT-S-32), text width
384 (see train_step.py for why). ``--sd15`` is the SD-1.x UNet + 768 ST channels at 512 px, local prompts through
ViT-L/14's text tower (for a GPU: ``--sd15 --device cuda --dtype bfloat16 --steps 50``). Prints a table per
images-per-call setting, writes ``sampling.json``. The README's CPU figures (1 torch thread, 2 cores) and the GPU
command::

    python benchmarks/sampling.py --threads 1 --steps 4 --repeats 7 --num-images 1,4 --out bench_output
    python benchmarks/sampling.py --sd15 --device cuda --dtype bfloat16 --steps 50 --num-images 1,4 --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers import schedulers as diffusers_schedulers
from transformers import CLIPTextModel, CLIPTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import bench_config  # noqa: E402

from bench_record import write_record
from spatext.model.config import DenoiserConfig, get_config  # noqa: E402
from spatext.model.denoiser import extend_conv_in, predict  # noqa: E402
from spatext.model.pipeline import LocalPromptEncoder, PriorModel, SpaTextPipeline  # noqa: E402
from spatext.model.scene import Scene, box_mask  # noqa: E402
from spatext.model.tiny_base import write_tiny_base_model  # noqa: E402

MODES = ("plain", "joint", "per-condition", "joint-concat", "per-condition-concat")
GOALS = {"joint": 1.05, "per-condition": 1.55}  # time / plain, issue 4
PASSES = {"plain": 2, "joint": 2, "per-condition": 3}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROMPT = "a red ball and a blue cube on green grass under a cloudy sky"


def base_parts(config: DenoiserConfig, folder: str) -> dict:
    """Text encoder, tokenizer, VAE and scheduler of a tiny base model with the config's text width and sizes."""
    small = copy.deepcopy(config)
    small.unet = {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 32,
                  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                  "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": config.text_embed_dim}
    path = write_tiny_base_model(os.path.join(folder, "base"), config=small)
    scheduler_cls = getattr(diffusers_schedulers, config.scheduler)
    return {
        "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
        "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        "vae": AutoencoderKL.from_pretrained(path, subfolder="vae"),
        "scheduler": scheduler_cls.from_pretrained(path, subfolder="scheduler"),
    }


class ConcatSTPipeline(SpaTextPipeline):
    """Reference: ``SpaTextPipeline`` with [sample; ST] through the full ``conv_in`` every step (no cached ST term)."""

    @contextlib.contextmanager
    def prepare_denoiser(self, st: torch.Tensor):
        """``predict`` on the concatenated input, as the pipeline ran before ``cached_st``."""
        yield lambda sample, t, text, image: predict(self.unet, sample, st, t, text, image)


def build_pipelines(config: DenoiserConfig, clip_model: str, device: str, dtype: torch.dtype, folder: str,
                    seed: int = 0) -> dict[str, StableDiffusionPipeline | SpaTextPipeline]:
    """The plain SD pipeline, the SpaText pipeline and its concat reference: same UNet body, text encoder, VAE."""
    parts = base_parts(config, folder)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device (an SD-sized UNet initialises slowly on a CPU)
        plain_unet = UNet2DConditionModel(**config.unet_kwargs())
        st_unet = extend_conv_in(copy.deepcopy(plain_unet), config.embed_dim)
    with torch.no_grad():  # non-zero ST weights, as after training
        st_unet.conv_in.weight[:, config.sample_channels:].normal_(0, 0.02)
    encoder = LocalPromptEncoder(clip_model=clip_model)
    prior = PriorModel(prior_config={"embed_dim": config.embed_dim, "hidden_dim": 256, "num_layers": 2})
    plain = StableDiffusionPipeline(
        unet=plain_unet, scheduler=copy.deepcopy(parts["scheduler"]), text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"], vae=parts["vae"], safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False,
    )
    spatext = SpaTextPipeline(unet=st_unet, scheduler=copy.deepcopy(parts["scheduler"]),
                              text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                              local_encoder=encoder, prior=prior, vae=parts["vae"])
    for pipe in (plain, spatext):
        pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)
    concat = ConcatSTPipeline(**spatext.components)  # the same modules (moved above), called sequentially
    for pipe in (plain, spatext, concat):
        pipe.set_progress_bar_config(disable=True)
    return {"plain": plain, "spatext": spatext, "concat": concat}


def make_scene(size: int) -> Scene:
    """Three boxes (one small) with local prompts."""
    boxes = [((0.0, 0.6, 1.0, 1.0), "green grass"), ((0.1, 0.3, 0.45, 0.7), "a red ball"),
             ((0.6, 0.4, 0.72, 0.52), "a small blue cube")]
    return Scene(PROMPT, [(box_mask(box, (size, size)), prompt) for box, prompt in boxes])


def sampler(pipes: dict, mode: str, steps: int, size: int, images: int, device: str):
    """A zero-argument callable running one sampling call of ``mode``."""
    generator = torch.Generator(device).manual_seed(0)
    common = {"num_inference_steps": steps, "height": size, "width": size, "num_images_per_prompt": images,
              "output_type": "latent", "generator": generator}
    if mode == "plain":
        return lambda: pipes["plain"](PROMPT, guidance_scale=7.5, **common)
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose from {', '.join(MODES)}")
    pipe = pipes["concat" if mode.endswith("-concat") else "spatext"]
    guidance = {"guidance_scale": 7.5}
    if mode.startswith("per-condition"):
        guidance = {"text_guidance_scale": 7.5, "st_guidance_scale": 3.0}
    scene = make_scene(size)
    return lambda: pipe(PROMPT, scene=scene, **guidance, **common)


def scene_work(pipes: dict, size: int, images: int, device: str):
    """A zero-argument callable running only the once-per-call work SpaText adds to plain CFG (steps 3-4 of its
    recipe: local prompts through CLIP text + prior, rasterising, ST), so a ratio above 1 can be attributed."""
    pipe, scenes = pipes["spatext"], [make_scene(size)]
    dtype = pipe.unet.dtype

    def run() -> torch.Tensor:
        embeddings = pipe.segment_embeddings(scenes, torch.device(device))
        return pipe.prepare_st(scenes, embeddings, (size, size), torch.device(device)).to(dtype).repeat_interleave(
            images, dim=0)

    return run


def time_calls(calls: dict, repeats: int, device: str) -> dict:
    """Seconds per call of each key: one warm-up call each, then ``repeats`` rounds in rotating order."""
    def timed(fn) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    for fn in calls.values():
        timed(fn)
    times: dict = {key: [] for key in calls}
    names = list(calls)
    for r in range(repeats):
        for key in names[r % len(names):] + names[: r % len(names)]:
            times[key].append(timed(calls[key]))
    return times


def count_flops(calls: dict) -> dict:
    """FLOPs of one call of each key (torch's FLOP counter: matmuls and convolutions; no timing noise)."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for key, fn in calls.items():
        with FlopCounterMode(display=False) as counter:
            fn()
        out[key] = counter.get_total_flops()
    return out


def _paired(times: list[float], reference: list[float]) -> float:
    """Median over rounds of the per-round ratio (each round times every mode within minutes: robust to slow drifts)."""
    return statistics.median(t / r for t, r in zip(times, reference, strict=True))


def summarize(times: dict[str, list[float]], flops: dict[str, int]) -> dict:
    """Medians, ratios to plain (time and FLOPs) and, per SpaText mode, the concat reference's time over its own.

    ``ratio_to_plain`` divides medians; ``paired_ratio_to_plain`` is the median of the per-round ratios.
    """
    times = dict(times)
    scene = times.pop("scene", None)
    med = {mode: statistics.median(v) for mode, v in times.items()}
    best = {mode: min(v) for mode, v in times.items()}
    result = {"median_s": med, "ratio_to_plain": {m: med[m] / med["plain"] for m in med},
              "min_s": best, "min_ratio_to_plain": {m: best[m] / best["plain"] for m in best},
              "paired_ratio_to_plain": {m: _paired(times[m], times["plain"]) for m in med}, "times_s": times,
              "flops": flops, "flop_ratio_to_plain": {m: flops[m] / flops["plain"] for m in flops}}
    concat = [m for m in GOALS if m in med and f"{m}-concat" in med]
    result["concat_over_cached"] = {m: med[f"{m}-concat"] / med[m] for m in concat}
    result["paired_concat_over_cached"] = {m: _paired(times[f"{m}-concat"], times[m]) for m in concat}
    if scene is not None:  # the once-per-call SpaText work, as a share of a plain call
        result["scene_s"] = {"median": statistics.median(scene), "min": min(scene), "times": scene}
        result["scene_share_of_plain"] = statistics.median(scene) / med["plain"]
    return result


def run_sampling_sets(config: DenoiserConfig, clip_model: str, steps: int, repeats: int, images: list[int],
                      device: str, dtype: torch.dtype, modes: tuple[str, ...] = MODES,
                      flops: bool = True) -> dict[str, dict]:
    """Build the pipelines once, time every (images per call, mode) pair interleaved; a result per ``images_N``.
    ``flops=False`` skips the FLOP count (torch's counter runs each call again, slowly: minutes at the SD-1.x shape)."""
    if "plain" not in modes:
        raise ValueError("modes: the ratios need 'plain'")
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        pipes = build_pipelines(config, clip_model, device, dtype, folder)
        size = config.resolution
        calls = {(n, mode): sampler(pipes, mode, steps, size, n, device) for n in images for mode in modes}
        counted = count_flops(calls) if flops else {}
        calls.update({(n, "scene"): scene_work(pipes, size, n, device) for n in images})
        times = time_calls(calls, repeats, device)
    out = {}
    for n in images:
        result = summarize({m: times[n, m] for m in (*modes, "scene")},
                           {m: counted[n, m] for m in modes if (n, m) in counted})
        result.update(steps=steps, images_per_call=n, size=size, dtype=str(dtype).removeprefix("torch."))
        out[f"images_{n}"] = result
    return out


def run_sampling(config: DenoiserConfig, clip_model: str, steps: int, repeats: int, images: int, device: str,
                 dtype: torch.dtype, modes: tuple[str, ...] = MODES) -> dict:
    """Build the pipelines, time the modes at ``images`` per call, return medians and ratios to plain."""
    return run_sampling_sets(config, clip_model, steps, repeats, [images], device, dtype, modes)[f"images_{images}"]


def _flop_ratio(result: dict, mode: str) -> str:
    """The FLOP ratio to plain for the table, or "-" where FLOPs were not counted (``--no-flops``)."""
    ratio = result["flop_ratio_to_plain"].get(mode)
    return "-" if ratio is None else f"{ratio:.4f}"


def print_table(result: dict) -> None:
    """The markdown table of one sampling result (one images-per-call setting)."""
    print("| mode | passes | median call (s) | time / plain | paired time / plain | best / best plain "
          "| FLOPs / plain | goal |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, median in result["median_s"].items():
        base = mode.removesuffix("-concat")
        goal = f"<= {GOALS[base]}" if mode in GOALS else ""
        print(f"| {mode} | {PASSES[base]} | {median:.3f} | {result['ratio_to_plain'][mode]:.3f} "
              f"| {result['paired_ratio_to_plain'][mode]:.3f} | {result['min_ratio_to_plain'][mode]:.3f} "
              f"| {_flop_ratio(result, mode)} | {goal} |")
    if "scene_s" in result:
        print(f"once-per-call SpaText work (local prompts -> CLIP text -> prior -> ST): median "
              f"{result['scene_s']['median'] * 1000:.1f} ms = {result['scene_share_of_plain']:.3f} of a plain call")
    for mode, ratio in result.get("concat_over_cached", {}).items():
        print(f"{mode}: concatenated conv_in every step / cached ST term = {ratio:.3f} "
              f"(paired {result['paired_concat_over_cached'][mode]:.3f})")


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """Flags of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="160,320,640,640", help="UNet block_out_channels (SD-1.x: 320,640,1280,1280)")
    p.add_argument("--layers", type=int, default=2, help="layers per block (SD-1.x: 2)")
    p.add_argument("--latent", type=int, default=32, help="latent side; images are 8x larger (SD-1.x: 64)")
    p.add_argument("--clip-model", default="ViT-S-32", help="open_clip model of the local encoder; sets D (384)")
    p.add_argument("--text-dim", type=int, default=384, help="text hidden size = cross-attention dim (SD-1.x: 768)")
    p.add_argument("--sd15", action="store_true",
                   help="the latent-sd15 config (SD-1.x UNet, 64x64 latents, D=768) with ViT-L-14; overrides the "
                        "shape flags above")
    p.add_argument("--steps", type=int, default=8, help="denoising steps per call")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per mode")
    p.add_argument("--num-images", default="1", help="images per call, comma-separated settings (e.g. 1,4)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated modes, from {', '.join(MODES)}")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights' dtype")
    p.add_argument("--no-flops", dest="flops", action="store_false",
                   help="skip the FLOP count (device-independent, and slow at the SD-1.x shape: one more call per "
                        "mode under torch's counter)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--out", default="bench_output", help="folder for sampling.json")
    args = p.parse_args(input_args)
    try:
        counts = [int(n) for n in args.num_images.split(",")]
    except ValueError:
        p.error(f"--num-images: comma-separated integers, got {args.num_images!r}")
    if min(counts) < 1 or args.steps < 1 or args.repeats < 1 or args.threads < 0:
        p.error("--num-images, --steps and --repeats must be >= 1, --threads >= 0")
    unknown = sorted(set(args.modes.split(",")) - set(MODES))
    if unknown or "plain" not in args.modes.split(","):
        p.error(f"--modes: got {args.modes!r}; give plain plus any of {', '.join(MODES[1:])}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run, print the tables, write JSON."""
    logging.basicConfig(level=logging.ERROR)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    import open_clip

    if args.sd15:
        config, clip_model = get_config("latent-sd15"), "ViT-L-14"
    else:
        dim = int(open_clip.get_model_config(args.clip_model)["embed_dim"])
        widths = [int(w) for w in args.widths.split(",")]
        config = bench_config(widths, args.layers, args.latent, dim, args.text_dim, args.clip_model)
        clip_model = args.clip_model
    images = [int(n) for n in args.num_images.split(",")]
    modes = tuple(m for m in MODES if m in args.modes.split(","))
    results = run_sampling_sets(config, clip_model, args.steps, args.repeats, images, args.device,
                                DTYPES[args.dtype], modes, flops=args.flops)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    record = {**results, "config": config.to_dict(), "args": vars(args), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "device": device, "machine": platform.machine(),
              "cpu_count": os.cpu_count()}
    shape = (f"UNet {list(config.unet['block_out_channels'])} x{config.unet.get('layers_per_block')}, "
             f"{config.sample_size}x{config.sample_size} latents ({config.resolution} px), D={config.embed_dim} "
             f"({clip_model}), {args.steps} DDIM steps")
    for n in images:
        print(f"{shape}, {n} image(s)/call, {args.device} {args.dtype}, {torch.get_num_threads()} threads")
        print_table(results[f"images_{n}"])
    write_record(args.out, "sampling.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
