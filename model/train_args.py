"""Flags of ``spatext train``: the parser, the per-kind defaults (denoiser or prior P) and their validation."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

from spatext.model.config import list_configs, read_config_json
from spatext.model.prior import list_prior_configs

DEFAULTS = {"denoiser": {"steps": 1000, "batch": 16, "lr": 1e-4}, "prior": {"steps": 500, "batch": 256, "lr": 1e-3}}


def flag(name: str) -> str:
    """``max_train_steps`` → ``--max-train-steps``: an argument's name as the user types it."""
    return f"--{name.replace('_', '-')}"


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
    p.add_argument("--decode-threads", type=int, default=2, help="threads decoding samples in each loader process "
                   "(the main one with 0 workers), up to two batches ahead of the training step; the same samples in "
                   "the same order for any count (1: decode in the loop itself, no overlap)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order, noise and dropout")
    p.add_argument("--log-sample-keys", action="store_true", help="lineage/debugging: each rank appends the key of "
                   "every sample it trains on to logs/keys-rank-R.csv (step, epoch, key)")


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
                   help="accelerate mixed precision; the frozen VAE and text encoder run in that dtype (pipeline/ is "
                   "still saved in fp32, with the base model's weights)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade UNet compute for memory")
    p.add_argument("--p-drop-text", type=float, default=0.1,
                   help="chance that a sample's global text (and image embedding) is replaced by the null one")
    p.add_argument("--p-drop-st", type=float, default=0.1, help="chance, independent of --p-drop-text, that a "
                   "sample's ST is zeroed")
    p.add_argument("--ema-decay", type=float, default=0.9999,
                   help="EMA decay of the UNet weights (0: no EMA); diffusers' EMAModel applies min(decay, "
                        "(1 + t) / (10 + t)) at step t, so the flag's value is reached only after ~10 / (1 - decay) "
                        "steps (90,000 for 0.9999)")
    p.add_argument("--checkpointing-steps", type=int, default=500,
                   help="checkpoint (and pipeline) every N steps; the last step always gets one (0: only that)")
    p.add_argument("--checkpoints-total-limit", type=int, default=None, help="keep only the newest N checkpoints")
    p.add_argument("--resume-from-checkpoint", default=None,
                   help="'latest' (newest in OUTPUT/checkpoints; none there: start fresh), a checkpoint's name there "
                   "(checkpoint-N) or a checkpoint dir; only "
                   "--max-train-steps and flags that do not change the weights (checkpoint, sample-grid and logging "
                   "cadence, --decode-threads, --gradient-checkpointing) may differ from the run's")
    p.add_argument("--sample-every", type=int, default=0, help="samples/step-N.png every N steps and at the end "
                   "(0: never)")
    p.add_argument("--num-validation", type=int, default=4, help="scenes in a sample grid: the first shard samples")
    p.add_argument("--sample-steps", type=int, default=25, help="denoising steps of the sample grid")
    p.add_argument("--sample-guidance-scale", type=float, default=7.5, help="joint guidance scale of the sample grid")


PRIOR_FLAGS = ("data", "config", "output", "max_train_steps", "train_batch_size", "learning_rate", "seed")


def build_parser() -> argparse.ArgumentParser:
    """The ``spatext train`` argument parser."""
    p = argparse.ArgumentParser(prog="spatext train", description="Train a SpaText denoiser (or the prior P) on "
                                "spatext shards", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _io_flags(p)
    _training_flags(p)
    return p


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags of ``spatext train`` (``python -m spatext.model.train``)."""
    return build_parser().parse_args(input_args)


def ignored_by_prior(args: argparse.Namespace) -> list[str]:
    """The flags set away from their defaults that prior training does not use (it reads only ``PRIOR_FLAGS``)."""
    parser = build_parser()
    return [flag(name) for name, value in vars(args).items()
            if name not in PRIOR_FLAGS and value != parser.get_default(name)]


def is_prior_config(name: str) -> bool:
    """Whether ``--config`` names a prior config (bundled ``prior-*`` or a JSON file with prior keys)."""
    if name in list_prior_configs():
        return True
    if name.endswith(".json") and os.path.isfile(name):
        data = read_config_json(name, name)
        return "hidden_dim" in data and "unet" not in data
    return False


def check_config_name(name: str, prior: bool) -> None:
    """Reject a ``--config`` that is neither a bundled config (denoiser or prior) nor a JSON file, listing both kinds
    (``--config`` trains either, so a mistyped prior name must not be answered with the denoisers alone)."""
    if prior or name in list_configs() or (name.endswith(".json") and os.path.isfile(name)):
        return
    raise ValueError(f"--config {name!r} is neither a bundled config (denoisers: {', '.join(list_configs())}; priors: "
                     f"{', '.join(list_prior_configs())}) nor a JSON file")


def check_lr_scheduler(name: str) -> None:
    """ValueError naming ``--lr-scheduler`` unless diffusers has a schedule of that name (checked before the shards
    and models load, not at the optimizer's set-up)."""
    from diffusers.optimization import SchedulerType  # lazy: diffusers is slow to import for --help

    names = [t.value for t in SchedulerType if t.value != "piecewise_constant"]  # needs step rules: no flag
    if name not in names:
        raise ValueError(f"--lr-scheduler {name!r} is not a diffusers schedule; one of {', '.join(names)}")


def check_prior_path(path: str) -> None:
    """ValueError naming ``--prior`` when its weights file does not exist (any fsspec path)."""
    import fsspec

    from spatext.model.prior import prior_file

    weights = prior_file(path)
    fs, local = fsspec.core.url_to_fs(weights)
    if not fs.exists(local):
        raise ValueError(f"--prior {path!r}: {weights} does not exist (pass a train-prior output folder or its "
                         ".safetensors file)")


def check_args(args: argparse.Namespace, prior: bool) -> None:
    """Fill per-kind defaults and reject bad values, naming the flag."""
    check_config_name(args.config, prior)
    kind = DEFAULTS["prior" if prior else "denoiser"]
    args.max_train_steps = kind["steps"] if args.max_train_steps is None else args.max_train_steps
    args.train_batch_size = kind["batch"] if args.train_batch_size is None else args.train_batch_size
    args.learning_rate = kind["lr"] if args.learning_rate is None else args.learning_rate
    for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "num_validation",
                 "sample_steps", "max_segments", "decode_threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"{flag(name)} must be >= 1, got {getattr(args, name)}")
    for name in ("checkpointing_steps", "sample_every", "dataloader_num_workers", "lr_warmup_steps", "shuffle_buffer"):
        if getattr(args, name) < 0:
            raise ValueError(f"{flag(name)} must be >= 0, got {getattr(args, name)}")
    for name in ("p_drop_text", "p_drop_st", "ema_decay"):
        if not 0.0 <= getattr(args, name) <= 1.0 or (name == "ema_decay" and args.ema_decay == 1.0):
            raise ValueError(f"{flag(name)} must be in [0, 1{']' if name != 'ema_decay' else ')'}, "
                             f"got {getattr(args, name)}")
    for name in ("checkpoints_total_limit", "resolution"):  # None: keep every checkpoint / the config's resolution
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"{flag(name)} must be >= 1 (or left out), got {getattr(args, name)}")
    if not math.isfinite(args.sample_guidance_scale):
        raise ValueError(f"--sample-guidance-scale must be a finite number, got {args.sample_guidance_scale}")
    if not 0 < args.learning_rate < math.inf:  # also refuses nan
        raise ValueError(f"--learning-rate must be a finite number > 0, got {args.learning_rate}")
    for name in ("adam_weight_decay", "max_grad_norm"):
        if not 0 <= getattr(args, name) < math.inf:
            raise ValueError(f"{flag(name)} must be a finite number >= 0, got {getattr(args, name)}")
    check_lr_scheduler(args.lr_scheduler)
    if not prior and args.prior is not None:
        check_prior_path(args.prior)
    if not prior and args.base_model is None:
        raise ValueError("--base-model is required for a denoiser config: its text encoder, tokenizer and scheduler "
                         "(and, for latent configs, VAE and UNet); tests use spatext.model.tiny_base")
