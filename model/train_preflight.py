"""What ``spatext train`` checks before it creates or touches anything in ``--output``: the config, the base model,
the checkpoint to resume from, and that a resumed run keeps every flag that decides what it trains.

Why first: a command that fails must leave no half-made run folder behind, and a resumed run must never record in
run.json values it did not use (the optimizer state brings back the old learning rate whatever the new flag says).

Flags a resume may change (``RESUME_MAY_CHANGE``): where the run is (``--output``, ``--resume-from-checkpoint``), how
long it goes on (``--max-train-steps``; with a decaying ``--lr-scheduler`` the rest of the schedule follows the new
value), and what it writes or how fast it reads, none of which changes the weights: ``--checkpointing-steps``,
``--checkpoints-total-limit``, ``--sample-every``, ``--num-validation``, ``--sample-steps``,
``--sample-guidance-scale``, ``--log-sample-keys``, ``--decode-threads`` (the same samples in the same order for any
count) and ``--gradient-checkpointing`` (the same math, less memory). Every other flag must equal the run's, including
``--dataloader-num-workers``: each worker batches its own rows, so the worker count decides which rows train together.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from dataclasses import dataclass

import torch
from accelerate.utils import get_int_from_env, parse_flag_from_env
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache

from spatext.model.checkpoint import CHECKPOINT_PREFIX, RUN_FILE, STATE_FILE, checkpoint_dirs, resolve_resume
from spatext.model.config import DenoiserConfig, get_config
from spatext.model.shard_files import read_footers, resolve_files
from spatext.model.train_args import flag

logger = logging.getLogger(__name__)

RESUME_MAY_CHANGE = (
    "output", "resume_from_checkpoint", "max_train_steps", "checkpointing_steps", "checkpoints_total_limit",
    "sample_every", "num_validation", "sample_steps", "sample_guidance_scale", "log_sample_keys", "decode_threads",
    "gradient_checkpointing",
)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "owner/name": a Hugging Face Hub model id


@dataclass
class Preflight:
    """The outcome of the checks: the config, the checkpoint to resume from (or None) and its counters, and the
    saved record of a run that is already finished at ``--max-train-steps`` (nothing to train), else None."""

    config: DenoiserConfig
    resume: str | None
    resume_state: dict | None
    finished: dict | None


def check_base_model(path: str | None, latent: bool) -> None:
    """Raise ValueError naming ``--base-model`` when it is neither a diffusers model folder with the parts a run
    loads (text encoder, tokenizer; VAE and UNet for a latent config) nor a Hub model id that can be resolved."""
    if path is None:
        raise ValueError("--base-model is required for a denoiser config")
    if os.path.isdir(path):
        needed = ["text_encoder/config.json", "tokenizer/"]
        needed += ["vae/config.json", "unet/config.json"] if latent else []
        missing = [n for n in needed if not os.path.exists(os.path.join(path, n))]
        if missing:
            raise ValueError(f"--base-model {path!r} is not a diffusers model folder: it has no {', '.join(missing)}")
        return
    if os.path.exists(path):
        raise ValueError(f"--base-model {path!r} is a file, not a diffusers model folder")
    hub = bool(HUB_ID.match(path)) and not os.path.isdir(path.split("/")[0])  # "runs/nope" with ./runs: a folder
    if hub and (not hub_constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(path, "model_index.json"), str)):
        return  # a Hub model id: diffusers and transformers download it (or read it from the cache)
    cache = " nor a Hub model in the local cache (HF_HUB_OFFLINE is set)" if hub else ""
    raise ValueError(f"--base-model {path!r}: no such folder{cache}; give a diffusers model folder (text_encoder/, "
                     "tokenizer/, vae/, unet/, scheduler/)")


def check_resolution(resolution: int | None, config: DenoiserConfig) -> None:
    """Refuse a ``--resolution`` the denoiser cannot take: it must be a multiple of the pixels per latent cell times
    the UNet's downsampling (2 per down block but the last), as the config's own resolution is."""
    if resolution is None:
        return
    per_cell = config.resolution // config.sample_size
    downsampling = 2 ** (len(config.unet["block_out_channels"]) - 1)
    step = per_cell * downsampling
    if resolution % step:
        raise ValueError(f"--resolution {resolution} does not fit config {config.name!r}: it must be a multiple of "
                         f"{step} ({per_cell} pixels per latent cell x {downsampling}, the UNet's downsampling), "
                         f"e.g. {max(1, round(resolution / step)) * step}")


def read_json(path: str) -> dict | None:
    """The JSON object in ``path``, or None when there is no such file; ValueError naming the file when it is not a
    JSON object (a damaged checkpoint or run record)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def checkpoint_run(checkpoint: str) -> str:
    """The run dir a checkpoint belongs to (RUN/checkpoints/checkpoint-N → RUN)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))


PATH_FLAGS = ("data", "base_model", "prior", "config")  # compared as the files they name, not as strings


def _named_path(value: object, cwd: str) -> object:
    """A path flag's value as the real path it names from ``cwd`` when that exists; else the value itself (a bundled
    config name, a Hub id, a remote URL)."""
    if not isinstance(value, str):
        return value
    path = os.path.join(cwd, os.path.expanduser(value))
    return os.path.realpath(path) if os.path.exists(path) else value


def changed_flags(args: argparse.Namespace, saved: dict, saved_cwd: str | None = None) -> list[str]:
    """``--flag NEW (run: OLD)`` for each flag that differs from the saved run's and may not change on resume.

    A flag the saved run does not record (added to the parser later) is not compared. Path flags compare the paths
    they name: the saved run's from its working directory ``saved_cwd`` (run.json's ``cwd``; runs without one: this
    one's), so a resume from another directory, or with an absolute path, is the same run.
    """
    new, here = vars(args), os.getcwd()

    def differs(k: str) -> bool:
        if k in PATH_FLAGS:
            return _named_path(saved[k], saved_cwd or here) != _named_path(new[k], here)
        return saved[k] != new[k]

    return [f"{flag(k)} {new[k]!r} (run: {saved[k]!r})" for k in sorted(new)
            if k not in RESUME_MAY_CHANGE and k in saved and differs(k)]


def check_resumed_run(args: argparse.Namespace, config: DenoiserConfig, checkpoint: str, state: dict) -> dict | None:
    """Refuse a resume whose config or result-deciding flags differ from those ``checkpoint`` was trained with: its
    own record (``training_state.json``'s "run"), else (checkpoints written before it had one) its run's run.json.
    Return run.json's record (None when there is none; a checkpoint without either is logged, not checked)."""
    run_dir = checkpoint_run(checkpoint)
    record = read_json(os.path.join(run_dir, RUN_FILE))
    identity = state.get("run") or record
    if identity is None:
        logger.warning("neither %s nor %s records the flags of the run that wrote %s: they cannot be compared with "
                       "this resume's", STATE_FILE, RUN_FILE, checkpoint)
        return None
    saved = identity.get("config")
    if saved is not None and saved != config.to_dict():
        raise ValueError(f"--config {args.config!r} differs from the config of the run in {run_dir!r} "
                         f"({saved.get('name')!r}); resume with the same config")
    changed = changed_flags(args, identity.get("args", {}), identity.get("cwd"))
    if changed:
        raise ValueError(f"--resume-from-checkpoint: flags differ from the run in {run_dir!r} and would change what "
                         f"it trains: {', '.join(changed)}; resume with the run's values (a resume may change only "
                         f"{', '.join(flag(k) for k in RESUME_MAY_CHANGE)})")
    return record


def check_same_data(args: argparse.Namespace, record: dict | None) -> None:
    """Refuse a resume whose ``--data`` now holds other shard files (by name) or another number of rows than when the
    run started (its lineage): the epoch's order would change mid-epoch, training rows twice or skipping some."""
    lineage = (record or {}).get("lineage") or {}
    if "shard_files" not in lineage or "num_rows" not in lineage:
        return
    files = resolve_files(args.data)
    then = sorted(os.path.basename(f) for f in lineage["shard_files"])
    now = sorted(os.path.basename(f) for f in files)
    rows = sum(sum(groups) for groups, _ in read_footers(files))
    if then != now or rows != lineage["num_rows"]:
        added, gone = sorted(set(now) - set(then)), sorted(set(then) - set(now))
        what = "; ".join(part for part in (f"added {', '.join(added[:3])}" if added else "",
                                           f"missing {', '.join(gone[:3])}" if gone else "") if part)
        raise ValueError(f"--data {args.data!r} changed since the run started: {len(now)} shard file(s) with {rows} "
                         f"rows, then {len(then)} with {lineage['num_rows']}{f' ({what})' if what else ''}; a resume "
                         "would train rows twice or skip some: resume on the run's shards, or start a new run")


def check_steps(args: argparse.Namespace, checkpoint: str, state: dict, record: dict | None) -> dict | None:
    """Refuse ``--max-train-steps`` below the checkpoint's step; at that step, return the run's record when the run is
    finished there (nothing to train, nothing to rewrite), else None (the end of the run is written again)."""
    step = int(state["global_step"])
    if args.max_train_steps < step:
        raise ValueError(f"--max-train-steps {args.max_train_steps} is below step {step} of the checkpoint "
                         f"{checkpoint!r}; pass --max-train-steps {step} or more")
    run_dir = checkpoint_run(checkpoint)
    finished = (record is not None and record.get("status") == "finished" and record.get("global_step") == step
                and run_dir == os.path.abspath(args.output) and os.path.isdir(os.path.join(run_dir, "pipeline")))
    return record if step == args.max_train_steps and finished else None


WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # accelerate's own list


def launched_world_size() -> int:
    """Processes the launcher started (``torchrun`` / ``accelerate launch`` / MPI set these variables; else 1)."""
    return get_int_from_env(list(WORLD_SIZE_VARS), 1)


def check_mixed_precision(args: argparse.Namespace) -> None:
    """fp16 needs an accelerator: accelerate runs no fp16 autocast on the CPU, and the fp16 text encoder would meet the
    fp32 UNet at the first step."""
    on_cpu = not torch.accelerator.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")  # accelerate --cpu
    if args.mixed_precision == "fp16" and on_cpu:
        raise ValueError("--mixed-precision fp16 needs a GPU (accelerate has no fp16 autocast on the CPU); on the CPU "
                         "use --mixed-precision bf16 or no")


def check_world_size(checkpoint: str, state: dict, record: dict | None) -> None:
    """Refuse a resume with another number of processes than the run that wrote ``checkpoint``: its learning-rate
    schedule and its place in the epoch count per process, so the schedule would jump and rows be trained twice."""
    samples = state.get("samples")  # one count per rank of the writing run
    wrote = len(samples) if isinstance(samples, list) else (record or {}).get("accelerate", {}).get("num_processes")
    world = launched_world_size()
    if wrote is None:
        logger.warning("%s records no process count: a resume with another number of processes than its run's would "
                       "not continue it exactly", checkpoint)
    elif wrote != world:
        raise ValueError(f"--resume-from-checkpoint {checkpoint!r} was written by a run of {wrote} process(es); this "
                         f"launch started {world}. The learning-rate schedule and the place in the epoch count per "
                         f"process, so resume with {wrote} (torchrun --nproc_per_node {wrote} / accelerate launch "
                         f"--num_processes {wrote})")


def check_later_checkpoints(args: argparse.Namespace, checkpoint: str, state: dict) -> None:
    """Refuse to resume from a step when OUTPUT/checkpoints holds later ones: they belong to the run that went on from
    it, and would mix with this one's (``latest`` would pick them, pruning would keep them, loss.csv would skip)."""
    step = int(state["global_step"])
    later = [d for d in checkpoint_dirs(args.output) if int(os.path.basename(d)[len(CHECKPOINT_PREFIX):]) > step]
    if later:
        names = ", ".join(os.path.basename(d) for d in later)
        raise ValueError(f"--resume-from-checkpoint {checkpoint!r} is step {step}, but {args.output}/checkpoints "
                         f"also holds {names}, from the run that went on from it; delete or move those first (or "
                         "resume into another --output), so that this run's checkpoints are not mixed with them")


def check_local_output(output: str) -> None:
    """Refuse a URL ``--output``: a run writes its folder (run.json; a denoiser's checkpoints through accelerate and
    pipeline through diffusers) with local file operations, which would make a folder named 'gs:' here."""
    if "://" in output:
        raise ValueError(f"--output {output!r}: a training run writes to a local folder path (a mounted bucket is "
                         "one); copy it to object storage afterwards (e.g. gcloud storage rsync -r RUN gs://...)")


def preflight(args: argparse.Namespace) -> Preflight:
    """Check a denoiser run's config, base model and resume before anything is written (ValueError naming the flag)."""
    config = get_config(args.config)
    check_mixed_precision(args)
    check_resolution(args.resolution, config)
    check_base_model(args.base_model, latent=config.variant == "latent")
    resume = resolve_resume(args)
    if resume is None:
        return Preflight(config, None, None, None)
    state = read_json(os.path.join(resume, STATE_FILE))
    if state is None:
        raise ValueError(f"--resume-from-checkpoint {resume!r} is not a checkpoint dir (no {STATE_FILE})")
    record = check_resumed_run(args, config, resume, state)
    check_same_data(args, state.get("run") or record)
    check_world_size(resume, state, record)
    check_later_checkpoints(args, resume, state)
    return Preflight(config, resume, state, check_steps(args, resume, state, record))
