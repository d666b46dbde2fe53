"""``spatext train``: train a SpaText denoiser (or the prior P) on spatext shards, with accelerate.

    spatext train --data build/ --config latent-tiny --base-model BASE_DIR --output runs/tiny --max-train-steps 500
    accelerate launch -m spatext.model.train --data gs://B/build --config latent-sd15 --base-model SD15_DIR \\
        --output runs/sd15 --mixed-precision bf16 --train-batch-size 32 --checkpointing-steps 1000
    spatext train --data build/ --config prior-tiny --output runs/prior      # a prior config trains P instead

A step: images (VAE latents for ``latent`` configs, pixels for ``pixel`` ones), the global caption through the base
model's frozen text encoder, ST built on the device from the label map and the segments' CLIP image embeddings
(``build_st``, small segments kept), each condition dropped independently (``--p-drop-text`` also drops the pixel
variant's image embedding, ``--p-drop-st`` zeroes ST), noise at a uniform random timestep of a DDPM schedule, and
the MSE against the config's target (epsilon, v or sample). Noise, timesteps and dropout come from generators seeded
by (``--seed``, micro-step, rank), so a resumed run draws what an uninterrupted one would.

The run directory (``--output``):
    run.json                      config, args, lineage (shards, their CLIP, base model, prior), versions, status
    pipeline/                     SpaTextPipeline.save_pretrained (EMA weights when EMA is on), at checkpoints and end
    checkpoints/checkpoint-N/     accelerate state (model.safetensors, optimizer, lr scheduler, RNG; read back with
                                  torch.load(weights_only=True)), ema.safetensors, training_state.json
    logs/loss.csv                 step, loss, lr, epoch, elapsed_s
    samples/step-N.png            per validation scene: real image | scene (labels as local prompts) | generated
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from spatext.model.checkpoint import (
    RUN_FILE,
    append_loss,
    load_checkpoint,
    reset_loss_log,
    resolve_resume,
    save_checkpoint,
    save_run,
    write_json,
)
from spatext.model.config import DenoiserConfig, get_config, list_configs
from spatext.model.data import ShardDataset, collate, to_model_input
from spatext.model.denoiser import uses_image_embedding
from spatext.model.guidance import drop_conditions
from spatext.model.pipeline import LocalPromptEncoder, PriorModel, SpaTextPipeline, build_pipeline
from spatext.model.prior import list_prior_configs, load_prior_config, train_prior
from spatext.model.sample import sample_grid, shard_scenes
from spatext.model.st import build_st
from spatext.pipeline.clip import RANDOM_INIT, RANDOM_INIT_LABEL, ClipSpec, clip_embed_dim, load_clip

logger = logging.getLogger(__name__)

UNTRAINED_PRIOR = "untrained (identity)"
DEFAULTS = {"denoiser": {"steps": 1000, "batch": 16, "lr": 1e-4}, "prior": {"steps": 500, "batch": 256, "lr": 1e-3}}
PACKAGES = ("spatext", "torch", "diffusers", "transformers", "accelerate", "open_clip_torch", "safetensors", "pyarrow")


def _io_flags(p: argparse.ArgumentParser) -> None:
    """Data, model and run-directory flags."""
    denoisers = ", ".join(c for c in list_configs() if not c.startswith("prior-"))
    p.add_argument("--data", required=True, help="build dir, folder, glob or Parquet file of shards (any fsspec path)")
    p.add_argument("--config", required=True, help=f"denoiser config ({denoisers}) or JSON file; a prior config "
                   f"({', '.join(list_prior_configs())}) or prior JSON trains the prior P instead")
    p.add_argument("--output", required=True, help="run dir: run.json, pipeline/, checkpoints/, logs/, samples/")
    p.add_argument("--base-model", default=None, help="diffusers-layout dir: text encoder, tokenizer, scheduler, "
                   "VAE and (latent configs) the UNet; required for denoiser configs")
    p.add_argument("--prior", default=None, help="trained prior (a prior run dir or .safetensors) saved with the "
                   "pipeline; default: an untrained (identity) prior, logged as such")
    p.add_argument("--clip-model", default=None, help="open_clip model of the local-prompt encoder; default (and "
                   "only value allowed): the shards' CLIP")
    p.add_argument("--clip-pretrained", default=None, help="its weights: tag, local file or 'none'; default: the "
                   "shards' ('none' when they were random)")
    p.add_argument("--resolution", type=int, default=None, help="training image size in pixels; default: the config's")
    p.add_argument("--max-segments", type=int, default=8, help="segments per sample (padded)")
    p.add_argument("--resample-segments", action="store_true", help="a random non-empty subset of segments per sample")
    p.add_argument("--shuffle-buffer", type=int, default=256, help="rows in the loader's shuffle buffer (0: in order)")
    p.add_argument("--dataloader-num-workers", type=int, default=0, help="DataLoader worker processes per rank")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order, noise and dropout")


def _training_flags(p: argparse.ArgumentParser) -> None:
    """Optimisation, conditioning dropout, EMA, checkpoint and sample-grid flags."""
    p.add_argument("--train-batch-size", type=int, default=None, help="samples per device per micro-batch; "
                   f"default {DEFAULTS['denoiser']['batch']} (prior: {DEFAULTS['prior']['batch']} rows)")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--learning-rate", type=float, default=None, help=f"AdamW learning rate; default "
                   f"{DEFAULTS['denoiser']['lr']} (prior: {DEFAULTS['prior']['lr']})")
    p.add_argument("--lr-scheduler", default="constant", help="diffusers schedule: constant, linear, cosine, ...")
    p.add_argument("--lr-warmup-steps", type=int, default=0, help="warm-up steps of the lr schedule")
    p.add_argument("--adam-weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0: none)")
    p.add_argument("--max-train-steps", type=int, default=None, help="total optimizer steps, resumed ones included; "
                   f"default {DEFAULTS['denoiser']['steps']} (prior: {DEFAULTS['prior']['steps']})")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                   help="accelerate mixed precision; the frozen VAE and text encoder run in that dtype")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade UNet compute for memory")
    p.add_argument("--p-drop-text", type=float, default=0.1,
                   help="chance that a sample's global text (and image embedding) is replaced by the null one")
    p.add_argument("--p-drop-st", type=float, default=0.1, help="chance, independent of --p-drop-text, that a "
                   "sample's ST is zeroed")
    p.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay of the UNet weights (0: no EMA)")
    p.add_argument("--checkpointing-steps", type=int, default=500,
                   help="checkpoint (and pipeline) every N steps; the last step always gets one (0: only that)")
    p.add_argument("--checkpoints-total-limit", type=int, default=None, help="keep only the newest N checkpoints")
    p.add_argument("--resume-from-checkpoint", default=None,
                   help="'latest' (newest in OUTPUT/checkpoints; none there: start fresh) or a checkpoint dir")
    p.add_argument("--sample-every", type=int, default=0, help="samples/step-N.png every N steps and at the end "
                   "(0: never)")
    p.add_argument("--num-validation", type=int, default=4, help="scenes in a sample grid: the first shard samples")
    p.add_argument("--sample-steps", type=int, default=25, help="denoising steps of the sample grid")
    p.add_argument("--sample-guidance-scale", type=float, default=7.5, help="joint guidance scale of the sample grid")


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags of ``spatext train`` (``python -m spatext.model.train``)."""
    p = argparse.ArgumentParser(prog="spatext train", description="Train a SpaText denoiser (or the prior P) on "
                                "spatext shards", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _io_flags(p)
    _training_flags(p)
    return p.parse_args(input_args)


def is_prior_config(name: str) -> bool:
    """Whether ``--config`` names a prior config (bundled ``prior-*`` or a JSON file with prior keys)."""
    if name in list_prior_configs():
        return True
    if name.endswith(".json") and os.path.isfile(name):
        with open(name, encoding="utf-8") as f:
            data = json.load(f)
        return isinstance(data, dict) and "hidden_dim" in data and "unet" not in data
    return False


def check_args(args: argparse.Namespace, prior: bool) -> None:
    """Fill per-kind defaults and reject bad values, naming the flag."""
    kind = DEFAULTS["prior" if prior else "denoiser"]
    args.max_train_steps = kind["steps"] if args.max_train_steps is None else args.max_train_steps
    args.train_batch_size = kind["batch"] if args.train_batch_size is None else args.train_batch_size
    args.learning_rate = kind["lr"] if args.learning_rate is None else args.learning_rate
    for flag in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "num_validation",
                 "sample_steps", "max_segments"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("checkpointing_steps", "sample_every", "dataloader_num_workers", "lr_warmup_steps", "shuffle_buffer"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    for flag in ("p_drop_text", "p_drop_st", "ema_decay"):
        if not 0.0 <= getattr(args, flag) <= 1.0 or (flag == "ema_decay" and args.ema_decay == 1.0):
            raise ValueError(f"--{flag.replace('_', '-')} must be in [0, 1{']' if flag != 'ema_decay' else ')'}, "
                             f"got {getattr(args, flag)}")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning-rate must be > 0, got {args.learning_rate}")
    if not prior and args.base_model is None:
        raise ValueError("--base-model is required for a denoiser config: its text encoder, tokenizer and scheduler "
                         "(and, for latent configs, VAE and UNet); tests use spatext.model.tiny_base")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a run depends on (no git)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def train_prior_run(args: argparse.Namespace) -> dict:
    """``--config prior-*``: train P with ``train_prior`` into OUTPUT (usable as ``--prior OUTPUT``) + run.json."""
    ignored = [f for f in ("base_model", "prior", "resume_from_checkpoint") if getattr(args, f) is not None]
    if ignored:
        logger.warning("prior training ignores %s", ", ".join(f"--{f.replace('_', '-')}" for f in ignored))
    started = time.perf_counter()
    metrics = train_prior(args.data, args.output, args.config, steps=args.max_train_steps,
                          batch_size=args.train_batch_size, lr=args.learning_rate, seed=args.seed)
    run = {"kind": "prior", "status": "finished", "global_step": args.max_train_steps, "args": vars(args),
           "config": load_prior_config(args.config).to_dict() | {"embed_dim": metrics["config"]["embed_dim"]},
           "metrics": metrics, "lineage": {"data": args.data, **metrics["lineage"]}, "versions": package_versions(),
           "wall_time_s": round(time.perf_counter() - started, 3)}
    write_json(os.path.join(args.output, RUN_FILE), run)
    return run


def resolve_clip(args: argparse.Namespace, meta: dict[str, str], config: DenoiserConfig) -> tuple[str, str]:
    """The local-prompt CLIP (model, pretrained): the shards' own; D must equal the config's embed_dim."""
    shard_model, dim = meta.get("clip_model"), int(meta["embed_dim"])
    if dim != config.embed_dim:
        raise ValueError(f"--config {config.name!r} has embed_dim={config.embed_dim} (ST channels) but the shards in "
                         f"--data {args.data!r} hold D={dim} embeddings ({shard_model}); pick a config with "
                         f"embed_dim={dim}")
    model = args.clip_model or shard_model
    if shard_model and model != shard_model:
        raise ValueError(f"--clip-model {model!r} differs from the shards' CLIP {shard_model!r}: local prompts must "
                         "be embedded by the CLIP that embedded the training segments")
    if clip_embed_dim(model) != config.embed_dim:
        raise ValueError(f"--clip-model {model!r} has D={clip_embed_dim(model)}, --config {config.name!r} "
                         f"embed_dim={config.embed_dim}")
    if config.clip_model != model:
        logger.warning("--config %s names CLIP %s but the shards use %s (same D=%d); using the shards' CLIP",
                       config.name, config.clip_model, model, dim)
    pretrained = args.clip_pretrained or meta.get("clip_pretrained") or RANDOM_INIT
    return model, RANDOM_INIT if pretrained == RANDOM_INIT_LABEL else pretrained


def load_prior_component(path: str | None, dim: int) -> tuple[PriorModel, str]:
    """The prior saved with the pipeline: ``--prior`` or an untrained (identity) one; and its label."""
    if path is None:
        cfg = load_prior_config("prior-tiny").to_dict() | {"embed_dim": dim}
        logger.warning("no --prior: the pipeline gets an %s prior (local prompts' CLIP text embeddings go into ST "
                       "unchanged); train one with --config prior-tiny", UNTRAINED_PRIOR)
        return PriorModel(prior_config=cfg), UNTRAINED_PRIOR
    prior = PriorModel.from_file(path)
    if prior.embed_dim != dim:
        raise ValueError(f"--prior {path!r} maps D={prior.embed_dim} embeddings, the shards have D={dim}")
    return prior, path


def build_training_pipeline(
    args: argparse.Namespace, config: DenoiserConfig, meta: dict
) -> tuple[SpaTextPipeline, dict]:
    """The pipeline whose UNet is trained, and the lineage of its parts."""
    clip_model, clip_pretrained = resolve_clip(args, meta, config)
    clip = load_clip(ClipSpec(model=clip_model, pretrained=clip_pretrained))
    encoder = LocalPromptEncoder.from_clip(clip)
    prior, prior_label = load_prior_component(args.prior, config.embed_dim)
    pipe = build_pipeline(config, args.base_model, encoder, prior, seed=args.seed)
    if pipe.scheduler.config.get("prediction_type") != config.prediction_type:
        logger.info("scheduler prediction_type set to the config's %s", config.prediction_type)
        pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config,
                                                              prediction_type=config.prediction_type)
    pipe.set_progress_bar_config(disable=True)
    random_init = ["local_encoder"] if clip.pretrained_label == RANDOM_INIT_LABEL else []
    random_init += ["unet"] if config.variant == "pixel" else []
    random_init += ["prior (untrained: identity)"] if prior_label == UNTRAINED_PRIOR else []
    unet_init = "random init" if config.variant == "pixel" else f"--base-model {args.base_model} + zero ST weights"
    lineage = {"clip_model": clip_model, "clip_pretrained": clip.pretrained_label, "base_model": args.base_model,
               "unet_init": unet_init, "prior": prior_label, "random_init": random_init}
    return pipe, lineage


def step_generators(
    seed: int, micro_step: int, rank: int, device: torch.device
) -> tuple[torch.Generator, torch.Generator]:
    """(CPU generator for dropout, device generator for noise / timesteps / VAE sampling) of one micro-step."""
    state = np.random.SeedSequence([seed, micro_step, rank]).generate_state(2, dtype=np.uint64)
    cpu = torch.Generator().manual_seed(int(state[0] >> 1))
    dev = torch.Generator(device=device).manual_seed(int(state[1] >> 1))
    return cpu, dev


def denoising_loss(
    unet: torch.nn.Module, noise_scheduler: DDPMScheduler, clean: torch.Tensor, text: torch.Tensor,
    st: torch.Tensor | None, image: torch.Tensor | None = None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MSE between the UNet's output at a random timestep and the scheduler's target; ``st=None``: a plain UNet.

    Calls ``unet`` itself (not ``denoiser.predict``) with predict's input layout, so a DDP wrapper sees the forward.
    """
    noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (clean.shape[0],), generator=generator, device=clean.device)
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    kind = noise_scheduler.config.prediction_type
    target = {"epsilon": noise, "sample": clean}.get(kind)
    target = noise_scheduler.get_velocity(clean, noise, timesteps) if kind == "v_prediction" else target
    model_input = noisy if st is None else torch.cat([noisy, st.to(noisy.dtype)], dim=1)  # predict()'s layout
    image = None if image is None else image.to(noisy.dtype)
    pred = unet(model_input, timesteps, encoder_hidden_states=text, class_labels=image).sample
    return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def encode_batch(
    pipe: SpaTextPipeline, batch: dict, device: torch.device, dtype: torch.dtype, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(clean sample, text tokens, ST, image embedding or None) of a batch, on the device (frozen encoders)."""
    pixels = to_model_input(batch["pixel_values"], device, dtype)  # uint8 -> [-1, 1] on the device
    if pipe.vae is not None:
        latents = pipe.vae.encode(pixels).latent_dist.sample(generator=generator)
        clean = (latents * pipe.vae.config.scaling_factor).float()
    else:
        clean = pixels.float()
    text = pipe.encode_prompt(batch["caption"], device)
    label_map = batch["label_map"].to(device, non_blocking=True)
    st = build_st(label_map, batch["segment_embeddings"].to(device, non_blocking=True), tuple(clean.shape[-2:]))
    image = batch["image_embedding"].to(device) if uses_image_embedding(pipe.unet) else None
    return clean, text, st, image


def training_loss(
    pipe: SpaTextPipeline, unet: torch.nn.Module, noise_scheduler: DDPMScheduler, batch: dict, null_text: torch.Tensor,
    args: argparse.Namespace, generators: tuple[torch.Generator, torch.Generator], dtype: torch.dtype,
) -> torch.Tensor:
    """The loss of one micro-batch: encode, build ST, drop conditions independently, denoise."""
    device = null_text.device
    clean, text, st, image = encode_batch(pipe, batch, device, dtype, generators[1])
    cond = drop_conditions(text, st, args.p_drop_text, args.p_drop_st, null_text, generators[0], image)
    return denoising_loss(unet, noise_scheduler, clean, cond.text, cond.st, cond.image, generators[1])


def write_sample_grid(s: Session, scenes: list, step: int) -> None:
    """samples/step-N.png of the current weights on the validation scenes."""
    with s.accelerator.autocast():
        grid = sample_grid(s.pipe, scenes, s.args.sample_steps, s.args.sample_guidance_scale, s.args.seed)
    os.makedirs(os.path.join(s.args.output, "samples"), exist_ok=True)
    grid.save(os.path.join(s.args.output, "samples", f"step-{step}.png"))


@dataclass
class Session:
    """Everything one denoiser run holds: the accelerator, data, pipeline, optimizer, EMA and run record."""

    args: argparse.Namespace
    config: DenoiserConfig
    accelerator: Accelerator
    dataset: ShardDataset
    pipe: SpaTextPipeline
    unet: torch.nn.Module  # the prepared (possibly DDP-wrapped) pipe.unet
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    noise_scheduler: DDPMScheduler
    ema: EMAModel | None
    dtype: torch.dtype
    lineage: dict
    resume: str | None


def check_resumed_config(args: argparse.Namespace, config: DenoiserConfig) -> None:
    """A resumed run must keep its config (the checkpoint's tensors have its shapes)."""
    path = os.path.join(args.output, RUN_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f).get("config")
        if saved is not None and saved != config.to_dict():
            raise ValueError(f"--config {args.config!r} differs from the config of the run in {args.output!r} "
                             f"({saved.get('name')!r}); resume with the same config")


def setup(args: argparse.Namespace) -> Session:
    """Build the accelerator, the shard loader, the pipeline, the optimizer, lr schedule and EMA."""
    config = get_config(args.config)
    resume = resolve_resume(args)
    if resume is not None:
        check_resumed_config(args, config)
    project = ProjectConfiguration(project_dir=args.output, logging_dir=os.path.join(args.output, "logs"))
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision, project_config=project)
    if not accelerator.is_local_main_process:
        logging.getLogger("spatext").setLevel(logging.ERROR)
    dataset = ShardDataset(args.data, args.resolution or config.resolution, shuffle_buffer=args.shuffle_buffer,
                           seed=args.seed, resample_segments=args.resample_segments, max_segments=args.max_segments,
                           rank=accelerator.process_index, world_size=accelerator.num_processes, uint8=True)
    pipe, lineage = build_training_pipeline(args, config, dataset.metadata)
    shard_meta = {k: dataset.metadata.get(k) for k in ("schema_version", "clip_model", "clip_pretrained", "embed_dim",
                                                        "segmenter", "segmenter_weights", "created", "package_version")}
    lineage = {"data": args.data, "shard_files": dataset.files, "num_rows": dataset.num_rows, "shards": shard_meta,
               **lineage}
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    pipe.to(accelerator.device)
    for frozen in (pipe.text_encoder, pipe.vae):
        if frozen is not None:
            frozen.requires_grad_(False).eval()
            if dtype != torch.float32:
                frozen.to(dtype=dtype)
    pipe.local_encoder.requires_grad_(False)
    pipe.prior.requires_grad_(False)
    unet = pipe.unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    prepared, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    ema = None
    if args.ema_decay > 0:
        ema = EMAModel(unet.parameters(), decay=args.ema_decay, model_cls=UNet2DConditionModel,
                       model_config=unet.config)
        ema.to(accelerator.device)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return Session(args, config, accelerator, dataset, pipe, prepared, optimizer, lr_scheduler, noise_scheduler, ema,
                   dtype, lineage, resume)


def run_record(s: Session, state: dict, status: str, started: float, last_loss: float | None) -> dict:
    """The content of run.json."""
    return {
        "kind": "denoiser", "status": status, "global_step": state["global_step"], "epoch": state["epoch"],
        "max_train_steps": s.args.max_train_steps, "last_loss": last_loss, "config": s.config.to_dict(),
        "args": vars(s.args), "lineage": s.lineage, "random_init": s.lineage["random_init"],
        "ema": s.ema is not None, "pipeline_weights": "EMA" if s.ema is not None else "trained",
        "accelerate": {"num_processes": s.accelerator.num_processes, "mixed_precision": s.args.mixed_precision,
                       "device": str(s.accelerator.device)},
        "versions": package_versions(), "wall_time_s": round(time.perf_counter() - started, 3),
    }


def micro_step(s: Session, batch: dict, null_text: torch.Tensor, micro: int) -> torch.Tensor:
    """Forward + backward of one micro-batch (optimizer step on the last of an accumulation); the mean loss."""
    acc = s.accelerator
    with acc.accumulate(s.unet):
        generators = step_generators(s.args.seed, micro, acc.process_index, acc.device)
        loss = training_loss(s.pipe, s.unet, s.noise_scheduler, batch, null_text, s.args, generators, s.dtype)
        acc.backward(loss)
        if acc.sync_gradients and s.args.max_grad_norm > 0:
            acc.clip_grad_norm_(s.unet.parameters(), s.args.max_grad_norm)
        s.optimizer.step()
        s.lr_scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
    return acc.gather(loss.detach()[None]).mean()


def after_step(s: Session, state: dict, loss: float, started: float, scenes: list) -> None:
    """Per optimizer step: EMA, loss log, checkpoint + pipeline, sample grid (files from the main process)."""
    args, acc = s.args, s.accelerator
    if s.ema is not None:
        s.ema.step(s.unet.parameters())
    state["global_step"] += 1
    step = state["global_step"]
    if not acc.is_main_process:
        return
    append_loss(args.output, step=step, loss=round(loss, 6), lr=s.lr_scheduler.get_last_lr()[0],
                epoch=state["epoch"], elapsed_s=round(time.perf_counter() - started, 3))
    if args.checkpointing_steps and step % args.checkpointing_steps == 0:
        save_checkpoint(acc, s.unet, s.ema, state, args)
        save_run(s.pipe, s.unet, s.ema, run_record(s, state, "in progress", started, loss), args.output)
    if args.sample_every and step % args.sample_every == 0:
        write_sample_grid(s, scenes, step)


def train(args: argparse.Namespace) -> dict:
    """Train a denoiser per ``args``; return the final run record (also in OUTPUT/run.json)."""
    started = time.perf_counter()
    s = setup(args)
    acc = s.accelerator
    state = {"global_step": 0, "epoch": 0, "batch_in_epoch": 0, "micro_step": 0}
    if s.resume is not None:
        state = load_checkpoint(acc, s.unet, s.ema, s.resume)
    scenes = []
    if acc.is_main_process:
        reset_loss_log(args.output, state["global_step"])
        size = s.dataset.resolution // s.pipe.vae_scale_factor
        scenes = shard_scenes(s.dataset, args.num_validation, size) if args.sample_every else []
    null_text = s.pipe.encode_prompt([""], acc.device).to(s.dtype)
    loader = torch.utils.data.DataLoader(s.dataset, batch_size=args.train_batch_size, collate_fn=collate,
                                         num_workers=args.dataloader_num_workers,
                                         pin_memory=acc.device.type == "cuda")
    progress = tqdm(total=args.max_train_steps, initial=state["global_step"], desc="steps",
                    disable=not acc.is_local_main_process)
    loss_sum, last_loss = 0.0, None
    logger.info("training %s on %d rows from step %d to %d (batch %d x %d accumulation x %d processes)",
                s.config.name, s.dataset.num_rows, state["global_step"], args.max_train_steps,
                args.train_batch_size, args.gradient_accumulation_steps, acc.num_processes)
    while state["global_step"] < args.max_train_steps:
        s.dataset.set_epoch(state["epoch"])
        seen = 0
        for i, batch in enumerate(loader):
            seen += 1
            if i < state["batch_in_epoch"]:
                continue  # resuming mid-epoch: the same order, the batches already trained on are skipped
            loss_sum += float(micro_step(s, batch, null_text, state["micro_step"])) / args.gradient_accumulation_steps
            state["batch_in_epoch"], state["micro_step"] = i + 1, state["micro_step"] + 1
            if acc.sync_gradients:
                last_loss, loss_sum = loss_sum, 0.0
                after_step(s, state, last_loss, started, scenes)
                progress.update(1)
                progress.set_postfix(loss=f"{last_loss:.4f}")
                if state["global_step"] >= args.max_train_steps:
                    break
        else:
            if not seen:
                raise ValueError(f"--data {args.data!r}: rank {acc.process_index} got no batch in epoch "
                                 f"{state['epoch']} (fewer rows than processes?)")
            state["epoch"], state["batch_in_epoch"] = state["epoch"] + 1, 0
    progress.close()
    return finish(s, state, started, last_loss, scenes)


def finish(s: Session, state: dict, started: float, last_loss: float | None, scenes: list) -> dict:
    """Final checkpoint (unless the last step wrote one), sample grid and pipeline + run.json."""
    args, acc = s.args, s.accelerator
    acc.wait_for_everyone()
    run = run_record(s, state, "finished", started, last_loss)
    if acc.is_main_process:
        step = state["global_step"]
        if not (args.checkpointing_steps and step % args.checkpointing_steps == 0):
            save_checkpoint(acc, s.unet, s.ema, state, args)
        if args.sample_every and step % args.sample_every:
            write_sample_grid(s, scenes, step)
        save_run(s.pipe, s.pipe.unet, s.ema, run, args.output)  # pipe.unet: the module inside any DDP wrapper
        logger.info("run written to %s (step %d, last loss %s)", args.output, step, last_loss)
    acc.end_training()
    return run


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Console entry (``spatext train``): parse, dispatch to denoiser or prior training, print a summary line."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    prior = is_prior_config(args.config)
    check_args(args, prior)
    os.makedirs(args.output, exist_ok=True)
    run = train_prior_run(args) if prior else train(args)
    if run.get("lineage", {}).get("random_init"):
        logger.warning("random weights in this run: %s", ", ".join(run["lineage"]["random_init"]))
    print(f"spatext train: {run['kind']} {args.config} -> {args.output} (step {run['global_step']}, "
          f"{run.get('wall_time_s')} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
