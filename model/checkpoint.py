"""Checkpoints and run files of `spatext train`: accelerate state + EMA as safetensors, exact resume, run.json, logs.

Nothing here unpickles: weights are safetensors, accelerate reads its optimizer / scheduler / RNG files with
`torch.load(weights_only=True)`, EMA shadow weights are a safetensors file with their counters in its metadata.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping

import safetensors.torch
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from spatext.model.pipeline import SpaTextPipeline
from spatext.pipeline.weights import safetensors_bytes

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
STATE_FILE = "training_state.json"
EMA_FILE = "ema.safetensors"
CHECKPOINT_PREFIX = "checkpoint-"
LOSS_FIELDS = ("step", "loss", "lr", "epoch", "elapsed_s")
# training_state.json: the counters a resume restarts from, and the totals run.json continues from (samples each rank
# trained on since step 0, seconds of training up to the checkpoint, the loss of its last step), and under "run" what
# it was trained with (``train_loop.checkpoint_identity``)
COUNTERS = ("global_step", "epoch", "batch_in_epoch", "micro_step")
TOTALS = ("samples", "elapsed_s", "last_loss")


class DivergedError(ValueError):
    """Training produced a non-finite loss: nothing after it is saved (a checkpoint of NaN weights, or a pruning that
    keeps only those, would lose the run)."""


def check_finite_loss(loss: float, step: int, lr_flag: str, lr: float, output: str) -> None:
    """DivergedError at a NaN / infinite loss, naming the step, the learning rate and the checkpoint to resume from."""
    if math.isfinite(loss):
        return
    found = checkpoint_dirs(output)
    last = f"the last checkpoint is {os.path.basename(found[-1])}" if found else "no checkpoint was written before it"
    raise DivergedError(f"the loss is {loss} at step {step}: training diverged (with {lr_flag} {lr:g}); nothing of "
                        f"this step was saved ({last}: resuming it with the same flags diverges again); start a new "
                        f"run with a lower {lr_flag}")


def write_json(path: str, data: dict) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def checkpoint_dirs(output: str, complete: bool = True) -> list[str]:
    """OUTPUT/checkpoints/checkpoint-N dirs, by increasing N: the complete ones (their ``training_state.json``, written
    last, is there), or with ``complete=False`` also those whose saving was cut short (a kill, a full disk)."""
    root = os.path.join(output, "checkpoints")
    found = [d for d in os.listdir(root) if re.fullmatch(CHECKPOINT_PREFIX + r"\d+", d)] if os.path.isdir(root) else []
    dirs = [os.path.join(root, d) for d in sorted(found, key=lambda d: int(d[len(CHECKPOINT_PREFIX):]))]
    return dirs if not complete else [d for d in dirs if os.path.isfile(os.path.join(d, STATE_FILE))]


def resolve_resume(args: argparse.Namespace) -> str | None:
    """The checkpoint dir to resume from, or None (fresh start); refuses to overwrite a run by accident."""
    found = checkpoint_dirs(args.output)
    if args.resume_from_checkpoint is None:
        if os.path.exists(os.path.join(args.output, RUN_FILE)) or checkpoint_dirs(args.output, complete=False):
            raise ValueError(f"--output {args.output!r} already holds a run; pass --resume-from-checkpoint latest "
                             "to continue it, or choose another --output")
        return None
    if args.resume_from_checkpoint == "latest":
        if not found and os.path.exists(os.path.join(args.output, RUN_FILE)):
            raise ValueError(f"--resume-from-checkpoint latest: {args.output!r} holds a run ({RUN_FILE}) but no "
                             f"checkpoint in {os.path.join(args.output, 'checkpoints')}: starting over would replace "
                             "it; restore its checkpoints, or choose another --output")
        cut = sorted(set(checkpoint_dirs(args.output, complete=False)) - set(found))
        if cut:
            logger.warning("--resume-from-checkpoint latest: passing over %s: no %s (its saving was cut short)",
                           ", ".join(os.path.basename(d) for d in cut), STATE_FILE)
        if not found:
            logger.info("--resume-from-checkpoint latest: no checkpoint in %s; starting fresh", args.output)
        return found[-1] if found else None
    given = args.resume_from_checkpoint
    if not os.path.isfile(os.path.join(given, STATE_FILE)) and os.sep not in given:
        named = os.path.join(args.output, "checkpoints", given)  # a bare name, as diffusers' scripts take it
        if os.path.isfile(os.path.join(named, STATE_FILE)):
            return named
    if not os.path.isfile(os.path.join(given, STATE_FILE)):
        there = [os.path.basename(d) for d in checkpoint_dirs(args.output)]
        raise ValueError(f"--resume-from-checkpoint {given!r} is not a checkpoint dir (no {STATE_FILE}); "
                         f"{args.output}/checkpoints holds " + (", ".join(there) if there else "none")
                         + " (a name there, a path, or 'latest')")
    return given


def checkpoint_path(output: str, step: int) -> str:
    """OUTPUT/checkpoints/checkpoint-STEP."""
    return os.path.join(output, "checkpoints", f"{CHECKPOINT_PREFIX}{step}")


def save_state(accelerator: Accelerator, path: str) -> None:
    """accelerate's ``save_state`` (every rank: the main process the weights, each its RNG state), a failure named
    with the folder and its free space (torch's own message for a full disk is 'unexpected pos 3719744 vs ...')."""
    try:
        accelerator.save_state(path, safe_serialization=True)
    except (OSError, RuntimeError) as exc:
        free = shutil.disk_usage(os.path.dirname(path)).free / 2**30 if os.path.isdir(os.path.dirname(path)) else 0
        raise OSError(f"could not write checkpoint {path} ({free:.2f} GiB free there; a full disk?): {exc}") from exc


def save_checkpoint(accelerator: Accelerator, unet: torch.nn.Module, ema: EMAModel | None, state: dict,
                    args: argparse.Namespace, identity: dict | None = None) -> str:
    """Complete checkpoints/checkpoint-N after every rank's ``save_state`` (the caller's): EMA, then the counters
    (``training_state.json``, written last: what makes it a checkpoint), with ``identity`` under "run" (the config,
    flags and data the checkpoint was trained with, which a resume must keep: run.json says the same, but is written
    after the checkpoint, so a run killed in between has none); then prune old ones."""
    path = checkpoint_path(args.output, state["global_step"])
    if ema is not None:
        names = [n for n, _ in accelerator.unwrap_model(unet).named_parameters()]
        tensors = {n: p.detach().cpu().contiguous() for n, p in zip(names, ema.shadow_params, strict=True)}
        meta = {k: json.dumps(v) for k, v in ema.state_dict().items() if k != "shadow_params"}
        with open(os.path.join(path, EMA_FILE), "wb") as handle:
            handle.write(safetensors_bytes(tensors, meta))
    write_json(os.path.join(path, STATE_FILE), {**state, "run": identity} if identity is not None else state)
    if args.checkpoints_total_limit:
        for old in checkpoint_dirs(args.output)[: -args.checkpoints_total_limit]:
            shutil.rmtree(old)
    logger.info("checkpoint written: %s", path)
    return path


def load_checkpoint(accelerator: Accelerator, unet: torch.nn.Module, ema: EMAModel | None, path: str) -> dict:
    """Restore a checkpoint (weights, optimizer, lr schedule, RNG, EMA); return its counters."""
    accelerator.load_state(path)
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    state.pop("run", None)  # what the checkpoint was trained with (checked before): not a counter
    if ema is not None:
        ema_path = os.path.join(path, EMA_FILE)
        if not os.path.isfile(ema_path):
            raise ValueError(f"--ema-decay {ema.decay} but {path!r} holds no EMA weights (trained with EMA off)")
        tensors = safetensors.torch.load_file(ema_path)
        with safetensors.safe_open(ema_path, "pt") as f:
            meta = {k: json.loads(v) for k, v in f.metadata().items()}
        names = [n for n, _ in accelerator.unwrap_model(unet).named_parameters()]
        shadow = [tensors[n].to(accelerator.device) for n in names]
        ema.load_state_dict({**meta, "decay": ema.decay, "shadow_params": shadow})
    logger.info("resumed from %s at step %d", path, state["global_step"])
    return state


@contextlib.contextmanager
def components_swapped(pipe: SpaTextPipeline, components: Mapping[str, torch.nn.Module]) -> Iterator[None]:
    """Within the block, ``pipe``'s named components are ``components`` (e.g. the fp32 originals of modules cast for
    mixed precision); the pipeline's own are put back when the block ends, also on an exception."""
    own = {name: getattr(pipe, name) for name in components}
    try:
        for name, module in components.items():
            setattr(pipe, name, module)
        yield
    finally:
        for name, module in own.items():
            setattr(pipe, name, module)


def save_run(pipe: SpaTextPipeline, unet: torch.nn.Module, ema: EMAModel | None, run: dict, output: str,
             originals: Mapping[str, torch.nn.Module] | None = None) -> None:
    """Write OUTPUT/pipeline (EMA weights when EMA is on) and OUTPUT/run.json.

    ``originals``: fp32 modules saved instead of the pipeline's components of the same names. Under mixed precision
    the frozen text encoder and VAE are cast to bf16 / fp16 for training; saving those would downgrade the base
    model's weights for good and leave a pipeline of mixed dtypes, so the pipeline is saved in fp32, as diffusers'
    training scripts do.
    """
    params = list(unet.parameters())
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        with components_swapped(pipe, originals or {}):
            pipe.save_pretrained(os.path.join(output, "pipeline"), safe_serialization=True)
    finally:
        if ema is not None:
            ema.restore(params)
    write_json(os.path.join(output, RUN_FILE), run)


def reset_loss_log(output: str, resume_step: int) -> float:
    """Start logs/loss.csv; on resume keep the rows up to the resumed step (later ones are redone). Returns the
    ``elapsed_s`` of the last row kept (0.0 when none)."""
    path = os.path.join(output, "logs", "loss.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows = []
    if resume_step and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, LOSS_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return float(rows[-1]["elapsed_s"]) if rows else 0.0


def append_loss(output: str, **row: float) -> None:
    """Append one step's row to logs/loss.csv."""
    with open(os.path.join(output, "logs", "loss.csv"), "a", encoding="utf-8", newline="") as f:
        csv.DictWriter(f, LOSS_FIELDS).writerow(row)
