"""The training loop of a ``spatext train`` denoiser run: epochs of micro-steps, per-step outputs, the end of the run.

Data parallel: every rank reads its own part of each epoch (``ShardDataset`` splits the shards' row groups across
ranks) and all ranks train on the same number of batches per epoch, the fewest any rank's part makes; a rank with
more (its rows, equal to within one per worker, round up to one more batch) skips the rest of its part in that epoch,
and the main process says so. Epoch counters, and so
the checkpoints' ``training_state.json``, are the same on every rank. Files are written by the main process; every
rank adds its RNG state to a checkpoint.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from spatext.model.checkpoint import (
    COUNTERS,
    TOTALS,
    append_loss,
    check_finite_loss,
    checkpoint_path,
    load_checkpoint,
    reset_loss_log,
    save_checkpoint,
    save_run,
    save_state,
)
from spatext.model.data import ShardDataset, collate
from spatext.model.sample import sample_grid, shard_scenes
from spatext.model.train_preflight import Preflight, preflight
from spatext.model.train_record import SampleLedger, rank_report, run_record
from spatext.model.train_setup import Session, setup
from spatext.model.train_step import micro_step

logger = logging.getLogger(__name__)


@dataclass
class Loop:
    """The moving parts of a run: the counters saved in checkpoints, the loss being accumulated, per-step outputs."""

    state: dict
    started: float  # time.perf_counter() when this session started
    ledger: SampleLedger
    bar: tqdm
    scenes: list = field(default_factory=list)  # validation scenes of the sample grid (main process)
    loss_sum: float = 0.0
    last_loss: float | None = None
    elapsed_before: float = 0.0  # training time of the sessions before a resume, up to its checkpoint

    def elapsed(self) -> float:
        """Seconds of training since step 0: earlier sessions (up to the resumed checkpoint) + this one."""
        return round(self.elapsed_before + time.perf_counter() - self.started, 3)


def write_sample_grid(s: Session, scenes: list, step: int) -> None:
    """samples/step-N.png of the current weights on the validation scenes."""
    args = s.args
    title = [f"step {step}: real | scene | generated ({args.sample_steps} steps, "
             f"guidance {args.sample_guidance_scale})"]
    if s.lineage["random_init"]:  # random weights are never silent, in pictures either
        title.append(f"random weights (pretrained: none): {', '.join(s.lineage['random_init'])}")
    with s.accelerator.autocast():
        grid = sample_grid(s.pipe, scenes, s.args.sample_steps, s.args.sample_guidance_scale, s.args.seed,
                           title=title)
    os.makedirs(os.path.join(s.args.output, "samples"), exist_ok=True)
    grid.save(os.path.join(s.args.output, "samples", f"step-{step}.png"))


def save_rank_checkpoint(s: Session, loop: Loop) -> None:
    """checkpoints/checkpoint-N (a collective: every rank calls it): the main process writes it (accelerate state, EMA,
    counters, and the totals a resumed run continues from: samples per rank, elapsed time, last loss; prunes old
    ones), the other ranks add their RNG state (``random_states_R.pkl``) through the same ``save_state``."""
    acc, state = s.accelerator, loop.state
    samples = [n for _, n in sorted(gather_object([(acc.process_index, loop.ledger.count)]))]
    save_state(acc, checkpoint_path(s.args.output, state["global_step"]))
    acc.wait_for_everyone()  # every rank's RNG state is written before the counters mark the checkpoint complete
    if acc.is_main_process:
        totals = {"samples": samples, "elapsed_s": loop.elapsed(), "last_loss": loop.last_loss}
        save_checkpoint(acc, s.unet, s.ema, {**state, **totals}, s.args, checkpoint_identity(s))


def checkpoint_identity(s: Session) -> dict:
    """What a checkpoint records of the run that wrote it, for a resume's checks (``train_preflight``): its config,
    flags and working directory (as run.json's ``config``, ``args``, ``cwd``) and the shards it reads (``lineage``'s
    files and rows)."""
    return {"config": s.config.to_dict(), "args": vars(s.args), "cwd": os.getcwd(),
            "lineage": {"shard_files": s.lineage["shard_files"], "num_rows": s.lineage["num_rows"]}}


def rank_batches(dataset: ShardDataset, batch_size: int, num_workers: int) -> int:
    """Batches this rank's DataLoader yields in the dataset's current epoch (each worker batches its own rows)."""
    workers = max(num_workers, 1)
    rows = [sum(u.num_rows for u in dataset.my_units(w, workers)) for w in range(workers)]
    return sum(math.ceil(n / batch_size) for n in rows)


def epoch_batches(s: Session, announce: bool) -> int:
    """Batches every rank trains on in the current epoch: the fewest any rank has (a collective over the ranks)."""
    acc, args, epoch = s.accelerator, s.args, s.dataset.epoch
    mine = rank_batches(s.dataset, args.train_batch_size, args.dataloader_num_workers)
    counts = [int(n) for n in acc.gather(torch.tensor([mine], device=acc.device)).tolist()]
    fewest = min(counts)
    if fewest == 0:
        raise ValueError(f"--data {args.data!r}: rank {counts.index(0)} got no batch in epoch {epoch} "
                         "(fewer rows than processes?)")
    if fewest < max(counts):
        logger.log(logging.WARNING if announce else logging.DEBUG, "epoch %d: batches per rank %s; every rank "
                   "trains on %d, the rest is skipped this epoch", epoch, counts, fewest)
    return fewest


def after_step(s: Session, loop: Loop) -> None:
    """Per optimizer step: EMA, progress, loss log, checkpoint + pipeline, sample grid (files: main process)."""
    args, acc, state = s.args, s.accelerator, loop.state
    if s.ema is not None:
        s.ema.step(s.unet.parameters())
    state["global_step"] += 1
    step = state["global_step"]
    check_finite_loss(loop.last_loss, step, "--learning-rate", args.learning_rate, args.output)
    loop.bar.update(1)
    loop.bar.set_postfix(loss=f"{loop.last_loss:.4f}")
    checkpoint = bool(args.checkpointing_steps and step % args.checkpointing_steps == 0)
    if not acc.is_main_process:
        if checkpoint:
            save_rank_checkpoint(s, loop)
        return
    append_loss(args.output, step=step, loss=round(loop.last_loss, 6), lr=s.stepped_lr,
                epoch=state["epoch"], elapsed_s=loop.elapsed())
    if checkpoint:
        save_rank_checkpoint(s, loop)
        save_run(s.pipe, s.unet, s.ema, run_record(s, state, "in progress", loop.elapsed(), loop.last_loss),
                 args.output, s.originals)
    if args.sample_every and step % args.sample_every == 0:
        write_sample_grid(s, loop.scenes, step)


def run_epoch(s: Session, loop: Loop, loader: torch.utils.data.DataLoader, null_text: torch.Tensor,
              announce: bool) -> None:
    """The current epoch (its rest when resuming mid-epoch), up to ``--max-train-steps``."""
    args, state = s.args, loop.state
    s.dataset.set_epoch(state["epoch"])
    batches = epoch_batches(s, announce)
    # resuming mid-epoch: the batches trained on are left out, undecoded but for fewer than the workers' count
    left_out = s.dataset.skip_batches(state["batch_in_epoch"], args.train_batch_size, args.dataloader_num_workers)
    seen = left_out
    for i, batch in enumerate(itertools.islice(loader, batches - left_out), start=left_out):
        seen += 1
        if i < state["batch_in_epoch"]:
            continue
        loop.ledger.add(state["global_step"] + 1, state["epoch"], batch["key"])
        loop.loss_sum += float(micro_step(s, batch, null_text, state["micro_step"])) / args.gradient_accumulation_steps
        state["batch_in_epoch"], state["micro_step"] = i + 1, state["micro_step"] + 1
        if s.accelerator.sync_gradients:
            loop.last_loss, loop.loss_sum = loop.loss_sum, 0.0
            after_step(s, loop)
            if state["global_step"] >= args.max_train_steps:
                return
    if seen < batches:
        raise RuntimeError(f"rank {s.accelerator.process_index}: the loader yielded {seen} batches in epoch "
                           f"{state['epoch']}, {batches} were planned")
    state["epoch"], state["batch_in_epoch"] = state["epoch"] + 1, 0


def resumed_totals(s: Session, state: dict) -> dict:
    """Split the totals (samples per rank, elapsed time, last loss) off a checkpoint's ``state`` (in place) and
    return them; warn where the checkpoint cannot give this rank's sample count (older checkpoint, other world size)."""
    totals = {k: state.pop(k) for k in TOTALS if k in state}
    samples = totals.get("samples")
    if samples is None or len(samples) != s.accelerator.num_processes:
        logger.warning("%s holds no per-rank sample counts for %d processes: run.json's ranks.samples counts this "
                       "session's samples only", s.resume, s.accelerator.num_processes)
        totals["samples"] = [0] * s.accelerator.num_processes
    return totals


def train(args: argparse.Namespace, checked: Preflight | None = None) -> dict:
    """Train a denoiser per ``args`` (``checked``: ``preflight``'s outcome when the caller ran it); return the final
    run record (also in OUTPUT/run.json).

    A run that is already finished at ``--max-train-steps`` is left as it is: its record is returned.
    """
    started = time.perf_counter()
    checked = checked or preflight(args)
    if checked.finished is not None:
        logger.info("%s is finished at step %d = --max-train-steps: nothing to train, nothing rewritten", args.output,
                    args.max_train_steps)
        return checked.finished
    s = setup(args, checked)
    acc = s.accelerator
    state = dict.fromkeys(COUNTERS, 0)
    totals = {"samples": [0] * acc.num_processes, "elapsed_s": 0.0, "last_loss": None}
    if s.resume is not None:
        state = load_checkpoint(acc, s.unet, s.ema, s.resume)
        totals = {**totals, **resumed_totals(s, state)}
    bar = tqdm(total=args.max_train_steps, initial=state["global_step"], desc="steps",
               disable=not acc.is_local_main_process)
    ledger = SampleLedger(args.output, acc.process_index, args.log_sample_keys, state["global_step"],
                          totals["samples"][acc.process_index])
    loop = Loop(state, started, ledger, bar, last_loss=totals["last_loss"], elapsed_before=totals["elapsed_s"])
    if acc.is_main_process:
        logged = reset_loss_log(args.output, state["global_step"])
        loop.elapsed_before = max(loop.elapsed_before, logged)  # an older checkpoint without elapsed_s: the log's
        size = s.dataset.resolution // s.pipe.vae_scale_factor
        loop.scenes = shard_scenes(s.dataset, args.num_validation, size) if args.sample_every else []
    null_text = s.pipe.encode_prompt([""], acc.device).to(s.dtype)
    loader = torch.utils.data.DataLoader(s.dataset, batch_size=args.train_batch_size, collate_fn=collate,
                                         num_workers=args.dataloader_num_workers,
                                         pin_memory=acc.device.type == "cuda")
    logger.info("training %s on %d rows from step %d to %d (batch %d x %d accumulation x %d processes)",
                s.config.name, s.dataset.num_rows, state["global_step"], args.max_train_steps,
                args.train_batch_size, args.gradient_accumulation_steps, acc.num_processes)
    first_epoch = state["epoch"]
    loop.started = time.perf_counter()  # training time: set-up (loading, the first scenes) not counted
    while state["global_step"] < args.max_train_steps:
        run_epoch(s, loop, loader, null_text, announce=state["epoch"] == first_epoch)
    bar.close()
    return finish(s, loop)


def finish(s: Session, loop: Loop) -> dict:
    """Final checkpoint (unless the last step wrote one), sample grid and pipeline + run.json; then check that the
    ranks' replicas ended identical."""
    args, acc, state = s.args, s.accelerator, loop.state
    acc.wait_for_everyone()
    ranks = rank_report(acc, s.unet, loop.ledger.count)
    step = state["global_step"]
    if not (args.checkpointing_steps and step % args.checkpointing_steps == 0):
        save_rank_checkpoint(s, loop)
    run = run_record(s, state, "finished", loop.elapsed(), loop.last_loss, ranks)
    if acc.is_main_process:
        if args.sample_every and step % args.sample_every:
            write_sample_grid(s, loop.scenes, step)
        save_run(s.pipe, s.pipe.unet, s.ema, run, args.output, s.originals)  # pipe.unet: inside any DDP wrapper
        logger.info("run written to %s (step %d, last loss %s)", args.output, step, loop.last_loss)
    acc.end_training()
    if ranks["weights_in_sync"] is False:
        raise RuntimeError(f"the ranks' weights differ after training (SHA-256 {ranks['weights_sha256']}): the "
                           f"data-parallel replicas diverged; {args.output} holds rank 0's")
    return run
