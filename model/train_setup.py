"""Setting up a denoiser run of ``spatext train``: the accelerator (one process or data parallel), the shard loader,
the pipeline whose UNet is trained (and the lineage of its parts), the optimizer, the lr schedule and EMA."""

from __future__ import annotations

import argparse
import copy
import logging
import os
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from spatext.model.config import DenoiserConfig
from spatext.model.data import ShardDataset
from spatext.model.pipeline import LocalPromptEncoder, PriorModel, SpaTextPipeline, build_pipeline
from spatext.model.prior import load_prior_config, load_prior_lineage
from spatext.model.tiny_base import read_weights_marker
from spatext.model.train_preflight import Preflight, launched_world_size, preflight
from spatext.pipeline.clip import RANDOM_INIT, RANDOM_INIT_LABEL, ClipSpec, clip_embed_dim, load_clip

logger = logging.getLogger(__name__)

UNTRAINED_PRIOR = "untrained (identity)"
def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """The run's accelerator; under a multi-process launcher on a machine without an accelerator device, multi-CPU.

    accelerate starts CPU data parallelism (gloo) only when asked (``cpu=True``, ``ACCELERATE_USE_CPU``): without this,
    ``torchrun --nproc_per_node 2`` on a CPU machine started two independent one-process runs writing into the same
    ``--output``. A launch that still ends up with fewer processes than the launcher started is refused.
    """
    world = launched_world_size()
    cpu = world > 1 and not torch.accelerator.is_available()
    project = ProjectConfiguration(project_dir=args.output, logging_dir=os.path.join(args.output, "logs"))
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision, project_config=project, cpu=cpu)
    if accelerator.num_processes != world:
        raise RuntimeError(f"the launcher started {world} processes but accelerate set up "
                           f"{accelerator.num_processes} ({accelerator.distributed_type}); each would train alone "
                           "into the same --output")
    if not accelerator.is_local_main_process:  # one process speaks: the others log errors only
        logging.getLogger().setLevel(logging.ERROR)
        logging.getLogger("spatext").setLevel(logging.ERROR)
    return accelerator


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


def load_prior_component(
    path: str | None, dim: int, clip_model: str | None = None, seed: int = 0
) -> tuple[PriorModel, str]:
    """The prior saved with the pipeline: ``--prior`` or an untrained (identity) one (initialised from ``seed``, so
    that two runs save the same weights); and its label.

    A ``--prior`` must map embeddings of the run's CLIP (``clip_model``): one trained in another CLIP space of the
    same size would load and run, and quietly put the wrong embeddings into ST."""
    if path is None:
        cfg = load_prior_config("prior-tiny").to_dict() | {"embed_dim": dim}
        logger.warning("no --prior: the pipeline gets an %s prior (local prompts' CLIP text embeddings go into ST "
                       "unchanged); train one with --config prior-tiny", UNTRAINED_PRIOR)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return PriorModel(prior_config=cfg), UNTRAINED_PRIOR
    prior = PriorModel.from_file(path)
    if not all(torch.isfinite(p).all() for p in prior.parameters()):
        raise ValueError(f"--prior {path!r} holds NaN or infinite weights (its training diverged): train it again")
    if prior.embed_dim != dim:
        raise ValueError(f"--prior {path!r} maps D={prior.embed_dim} embeddings, the shards have D={dim}")
    trained_on = load_prior_lineage(path).get("clip_model")
    if clip_model is not None and trained_on is not None and trained_on != clip_model:
        raise ValueError(f"--prior {path!r} was trained on {trained_on} embeddings but this run uses {clip_model} "
                         f"(both D={dim}): a prior maps within one CLIP space; train one on these shards "
                         "(spatext train --config prior-tiny)")
    return prior, path


def build_training_pipeline(
    args: argparse.Namespace, config: DenoiserConfig, meta: dict
) -> tuple[SpaTextPipeline, dict]:
    """The pipeline whose UNet is trained, and the lineage of its parts."""
    clip_model, clip_pretrained = resolve_clip(args, meta, config)
    clip = load_clip(ClipSpec(model=clip_model, pretrained=clip_pretrained))
    encoder = LocalPromptEncoder.from_clip(clip)
    prior, prior_label = load_prior_component(args.prior, config.embed_dim, clip_model, seed=args.seed)
    pipe = build_pipeline(config, args.base_model, encoder, prior, seed=args.seed)
    resolution = args.resolution or config.resolution
    if resolution != config.resolution:  # the saved pipeline (and the run's sample grids) generate at the trained size
        pipe.unet.register_to_config(sample_size=resolution // (config.resolution // config.sample_size))
        logger.info("--resolution %d: the pipeline's default size is %d px (config %r: %d px)", resolution,
                    resolution, config.name, config.resolution)
    if pipe.scheduler.config.get("prediction_type") != config.prediction_type:
        logger.info("scheduler prediction_type set to the config's %s", config.prediction_type)
        pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config,
                                                              prediction_type=config.prediction_type)
    pipe.set_progress_bar_config(disable=True)
    # Parts whose weights stay random (the run does not train them). The pixel variant's UNet starts from random
    # init but is what the run trains (lineage: unet_init); it takes only the text encoder from the base model.
    random_init = ["local_encoder"] if clip.pretrained_label == RANDOM_INIT_LABEL else []
    random_init += ["prior (untrained: identity)"] if prior_label == UNTRAINED_PRIOR else []
    base_marker = read_weights_marker(args.base_model) if args.base_model else None
    if base_marker is not None and base_marker["pretrained"] == RANDOM_INIT_LABEL:  # e.g. spatext tiny-base-model
        parts = "text_encoder" if config.variant == "pixel" else "unet, vae, text_encoder"
        random_init += [f"base model ({parts}): {RANDOM_INIT_LABEL}"]
    unet_init = "random init" if config.variant == "pixel" else f"--base-model {args.base_model} + zero ST weights"
    lineage = {"clip_model": clip_model, "clip_pretrained": clip.pretrained_label, "base_model": args.base_model,
               "base_model_weights": base_marker["pretrained"] if base_marker else "as loaded (provenance not given)",
               "unet_init": unet_init, "prior": prior_label, "random_init": random_init}
    return pipe, lineage


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
    originals: dict[str, torch.nn.Module] = field(default_factory=dict)  # fp32 frozen modules, saved in pipeline/
    stepped_lr: float | None = None  # the learning rate of the last optimizer step (loss.csv logs it)


def freeze_encoders(pipe: SpaTextPipeline, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """Text encoder and VAE frozen in eval mode, local encoder and prior frozen; under mixed precision the pipeline
    gets copies of the text encoder and VAE in ``dtype`` (half the memory, no autocast round trips).

    Returns the fp32 originals of what was cast, by component name (empty without mixed precision), untouched, for
    ``save_run``: a cast loses precision, so the saved pipeline must take these, not the copies. Call it before moving
    the pipeline to the device, so that the originals stay where they were loaded (CPU).
    """
    originals = {}
    for name in ("text_encoder", "vae"):
        frozen = getattr(pipe, name)
        if frozen is None:
            continue
        frozen.requires_grad_(False).eval()
        if dtype != torch.float32:
            originals[name] = frozen
            setattr(pipe, name, copy.deepcopy(frozen).to(dtype=dtype))
    pipe.local_encoder.requires_grad_(False)
    pipe.prior.requires_grad_(False)
    return originals


def setup(args: argparse.Namespace, checked: Preflight | None = None) -> Session:
    """Build the accelerator, the shard loader, the pipeline, the optimizer, lr schedule and EMA (after ``preflight``'s
    checks; ``checked``: their outcome when the caller ran them)."""
    checked = checked or preflight(args)
    config, resume = checked.config, checked.resume
    accelerator = make_accelerator(args)
    dataset = ShardDataset(args.data, args.resolution or config.resolution, shuffle_buffer=args.shuffle_buffer,
                           seed=args.seed, resample_segments=args.resample_segments, max_segments=args.max_segments,
                           rank=accelerator.process_index, world_size=accelerator.num_processes, uint8=True,
                           decode_threads=args.decode_threads, decode_ahead=2 * args.train_batch_size)
    pipe, lineage = build_training_pipeline(args, config, dataset.metadata)
    shard_meta = {k: dataset.metadata.get(k) for k in ("schema_version", "clip_model", "clip_pretrained", "embed_dim",
                                                        "segmenter", "segmenter_weights", "created", "package_version")}
    lineage = {"data": args.data, "shard_files": dataset.files, "num_rows": dataset.num_rows, "shards": shard_meta,
               **lineage}
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    originals = freeze_encoders(pipe, dtype)
    pipe.to(accelerator.device)
    unet = pipe.unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,  # a prepared scheduler steps once per process
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
                   dtype, lineage, resume, originals)
