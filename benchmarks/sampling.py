"""Sampling time: plain two-pass CFG vs SpaText's accelerated joint guidance vs per-condition guidance, one run.

The three modes, same UNet body and size, same scheduler (DDIM), same number of steps, same image size:
  plain          diffusers' own ``StableDiffusionPipeline`` with the base UNet (latent channels in, no ST), global
                 prompt only, classifier-free guidance: 2 passes (uncond, text) batched into one forward per step;
  joint          ``SpaTextPipeline`` with ``guidance_scale`` (ε(∅) + s·(ε(text, ST) − ε(∅))): 2 passes batched, plus
                 the once-per-image work SpaText adds (local prompts through CLIP text + prior, rasterising, ST);
  per-condition  ``SpaTextPipeline`` with ``text_guidance_scale`` + ``st_guidance_scale``: 3 passes batched.
The SpaText UNet is the plain UNet's copy with D input channels added to ``conv_in``. Every call ends at the latents
(``output_type="latent"``; the VAE decode, identical in all three, is left out). Text encoder, tokenizer and VAE come
from ``write_tiny_base_model`` (a 2-layer text encoder of the right width); the local encoder is the open_clip text
tower of a CLIP with that D, random weights. Timings are medians of interleaved calls after a warm-up call.

Default shape (CPU): the SD-1.x UNet layout at half width on 32x32 latents (256 px), D=384 (ViT-S-32), text width
384 (see train_step.py for why). Prints a table, writes JSON.

    python benchmarks/sampling.py --out bench_output
"""

from __future__ import annotations

import argparse
import copy
import json
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

from spatext.model.config import DenoiserConfig  # noqa: E402
from spatext.model.denoiser import extend_conv_in  # noqa: E402
from spatext.model.pipeline import LocalPromptEncoder, PriorModel, SpaTextPipeline  # noqa: E402
from spatext.model.scene import Scene, box_mask  # noqa: E402
from spatext.model.tiny_base import write_tiny_base_model  # noqa: E402

MODES = ("plain", "joint", "per-condition")
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


def build_pipelines(config: DenoiserConfig, clip_model: str, device: str, dtype: torch.dtype, folder: str,
                    seed: int = 0) -> tuple[StableDiffusionPipeline, SpaTextPipeline]:
    """The plain SD pipeline and the SpaText pipeline: same UNet body, same text encoder, VAE and scheduler."""
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
        pipe.set_progress_bar_config(disable=True)
    return plain, spatext


def make_scene(size: int) -> Scene:
    """Three boxes (one small) with local prompts."""
    boxes = [((0.0, 0.6, 1.0, 1.0), "green grass"), ((0.1, 0.3, 0.45, 0.7), "a red ball"),
             ((0.6, 0.4, 0.72, 0.52), "a small blue cube")]
    return Scene(PROMPT, [(box_mask(box, (size, size)), prompt) for box, prompt in boxes])


def sampler(plain: StableDiffusionPipeline, spatext: SpaTextPipeline, mode: str, steps: int, size: int,
            images: int, device: str):
    """A zero-argument callable running one sampling call of ``mode``."""
    generator = torch.Generator(device).manual_seed(0)
    common = {"num_inference_steps": steps, "height": size, "width": size, "num_images_per_prompt": images,
              "output_type": "latent"}
    scene = make_scene(size)
    if mode == "plain":
        return lambda: plain(PROMPT, guidance_scale=7.5, generator=generator, **common)
    if mode == "joint":
        return lambda: spatext(PROMPT, scene=scene, guidance_scale=7.5, generator=generator, **common)
    return lambda: spatext(PROMPT, scene=scene, text_guidance_scale=7.5, st_guidance_scale=3.0,
                           generator=generator, **common)


def time_modes(calls: dict, repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each mode: one warm-up call each, then ``repeats`` rounds in rotating order."""
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
    times: dict[str, list[float]] = {mode: [] for mode in calls}
    names = list(calls)
    for r in range(repeats):
        for mode in names[r % len(names):] + names[: r % len(names)]:
            times[mode].append(timed(calls[mode]))
    return times


def count_flops(calls: dict) -> dict[str, int]:
    """FLOPs of one call of each mode (torch's FLOP counter: matmuls and convolutions; no timing noise)."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for mode, fn in calls.items():
        with FlopCounterMode(display=False) as counter:
            fn()
        out[mode] = counter.get_total_flops()
    return out


def run_sampling(config: DenoiserConfig, clip_model: str, steps: int, repeats: int, images: int, device: str,
                 dtype: torch.dtype) -> dict:
    """Build both pipelines, time the three modes, return medians and ratios to plain."""
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        plain, spatext = build_pipelines(config, clip_model, device, dtype, folder)
        size = config.resolution
        calls = {mode: sampler(plain, spatext, mode, steps, size, images, device) for mode in MODES}
        times = time_modes(calls, repeats, device)
        flops = count_flops(calls)
    med = {mode: statistics.median(v) for mode, v in times.items()}
    return {"median_s": med, "ratio_to_plain": {m: med[m] / med["plain"] for m in MODES}, "times_s": times,
            "flops": flops, "flop_ratio_to_plain": {m: flops[m] / flops["plain"] for m in MODES},
            "steps": steps, "images_per_call": images, "size": size, "dtype": str(dtype).removeprefix("torch.")}


def print_table(result: dict) -> None:
    """The markdown table of one sampling result."""
    goals = {"plain": "", "joint": "<= 1.05", "per-condition": "<= 1.55"}
    passes = {"plain": 2, "joint": 2, "per-condition": 3}
    print("| mode | passes | median call (s) | time / plain | FLOPs / plain | goal |")
    print("|---|---|---|---|---|---|")
    for mode in MODES:
        print(f"| {mode} | {passes[mode]} | {result['median_s'][mode]:.3f} | {result['ratio_to_plain'][mode]:.3f} "
              f"| {result['flop_ratio_to_plain'][mode]:.4f} | {goals[mode]} |")


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """Flags of the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="160,320,640,640", help="UNet block_out_channels (SD-1.x: 320,640,1280,1280)")
    p.add_argument("--layers", type=int, default=2, help="layers per block (SD-1.x: 2)")
    p.add_argument("--latent", type=int, default=32, help="latent side; images are 8x larger (SD-1.x: 64)")
    p.add_argument("--clip-model", default="ViT-S-32", help="open_clip model of the local encoder; sets D (384)")
    p.add_argument("--text-dim", type=int, default=384, help="text hidden size = cross-attention dim (SD-1.x: 768)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps per call")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per mode")
    p.add_argument("--num-images", type=int, default=1, help="images per call")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--out", default="bench_output", help="folder for sampling.json")
    return p.parse_args(input_args)


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write JSON."""
    logging.basicConfig(level=logging.ERROR)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import open_clip

    dim = int(open_clip.get_model_config(args.clip_model)["embed_dim"])
    widths = [int(w) for w in args.widths.split(",")]
    config = bench_config(widths, args.layers, args.latent, dim, args.text_dim, args.clip_model)
    result = run_sampling(config, args.clip_model, args.steps, args.repeats, args.num_images, args.device,
                          torch.float32)
    result.update(config=config.to_dict(), args=vars(args), torch=torch.__version__, threads=torch.get_num_threads(),
                  machine=platform.processor() or platform.machine(), cpu_count=os.cpu_count())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sampling.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"UNet {widths} x{args.layers}, {args.latent}x{args.latent} latents ({8 * args.latent} px), D={dim} "
          f"({args.clip_model}), {args.steps} DDIM steps, {args.num_images} image(s)/call, {args.device}, "
          f"{torch.get_num_threads()} threads")
    print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
