"""``spatext train``: train a SpaText denoiser (or the prior P) on spatext shards, with accelerate.

    spatext train --data build/ --config latent-tiny --base-model BASE_DIR --output runs/tiny --max-train-steps 500
    accelerate launch -m spatext.model.train --data gs://B/build --config latent-sd15 --base-model SD15_DIR \\
        --output runs/sd15 --mixed-precision bf16 --train-batch-size 32 --checkpointing-steps 1000
    torchrun --standalone --nproc_per_node 2 -m spatext.model.train ...   # data parallel (CPU: gloo, as tested)
    spatext train --data build/ --config prior-tiny --output runs/prior      # a prior config trains P instead

A step: images (VAE latents for ``latent`` configs, pixels for ``pixel`` ones), the global caption through the base
model's frozen text encoder, ST built on the device from the label map and the segments' CLIP image embeddings
(``build_st``, small segments kept), each condition dropped independently (``--p-drop-text`` also drops the pixel
variant's image embedding, ``--p-drop-st`` zeroes ST), noise at a uniform random timestep of a DDPM schedule, and
the MSE against the config's target (epsilon, v or sample). Noise, timesteps and dropout come from generators seeded
by (``--seed``, micro-step, rank), so a resumed run draws what an uninterrupted one would.

The run directory (``--output``):
    run.json                      config, args, lineage (shards, their CLIP, base model, prior), versions, status,
                                  ranks (samples each rank trained on, fingerprints of their final weights)
    pipeline/                     SpaTextPipeline.save_pretrained (EMA weights when EMA is on), at checkpoints and end
    checkpoints/checkpoint-N/     accelerate state (model.safetensors, optimizer, lr scheduler, RNG per rank; read back
                                  with torch.load(weights_only=True)), ema.safetensors, training_state.json (counters,
                                  the totals a resume continues: samples per rank, elapsed_s, last_loss; and "run":
                                  the config, flags and shards it was trained with, which a resume must keep)
    logs/loss.csv                 step, loss (mean over ranks), lr, epoch, elapsed_s (since step 0, over resumes)
    logs/keys-rank-R.csv          with --log-sample-keys: step, epoch, key of every sample rank R trained on
    samples/step-N.png            per validation scene: real image | scene (labels as local prompts) | generated

The code: ``train_args`` (flags), ``train_setup`` (accelerator, data, pipeline, optimizer), ``train_step`` (one
micro-step), ``train_loop`` (epochs, checkpoints, the end of a run), ``train_record`` (run.json, per-rank lineage),
``train_preflight`` (the checks made before anything is written: config, base model, what a resume may change).
The pipeline is saved in fp32 also under ``--mixed-precision``, from the base model's fp32 text encoder and VAE.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from collections.abc import Sequence

from spatext.cli import command_logging
from spatext.locks import folder_lock
from spatext.model.checkpoint import RUN_FILE, write_json
from spatext.model.prior import check_prior_output, load_prior_config
from spatext.model.prior_train import train_prior
from spatext.model.train_args import PRIOR_FLAGS, check_args, ignored_by_prior, is_prior_config, parse_args
from spatext.model.train_loop import train
from spatext.model.train_preflight import check_local_output, launched_world_size, preflight
from spatext.model.train_record import run_versions

logger = logging.getLogger("spatext.model.train")  # not __name__: that is "__main__" under `python -m`


def train_prior_run(args: argparse.Namespace) -> dict:
    """``--config prior-*``: train P with ``train_prior`` into OUTPUT (usable as ``--prior OUTPUT``) + run.json."""
    world = launched_world_size()
    if world > 1:
        raise ValueError(f"--config {args.config!r} trains the prior in one process; the launcher started {world}: "
                         "run it without torchrun / accelerate launch")
    existing = os.path.join(args.output, RUN_FILE)
    if os.path.exists(existing):  # a prior trains from scratch: never over another run's record and files
        raise ValueError(f"--output {args.output!r} already holds a run ({existing}); a prior has no resume: choose "
                         "another --output")
    check_prior_output(args.output)
    ignored = ignored_by_prior(args)
    if ignored:
        logger.warning("prior training ignores %s", ", ".join(ignored))
    started = time.perf_counter()
    metrics = train_prior(args.data, args.output, args.config, steps=args.max_train_steps,
                          batch_size=args.train_batch_size, lr=args.learning_rate, seed=args.seed)
    random_init = [] if not str(metrics["lineage"].get("clip_pretrained", "")).startswith("none") else [
        "clip (the shards' embeddings: pretrained none (random init))"]
    if random_init:
        logger.warning("random weights in this run: %s", ", ".join(random_init))
    run = {"kind": "prior", "status": "finished", "global_step": args.max_train_steps,
           "args": {name: getattr(args, name) for name in PRIOR_FLAGS}, "optimization": metrics["optimization"],
           "config": load_prior_config(args.config).to_dict() | {"embed_dim": metrics["config"]["embed_dim"]},
           "metrics": metrics, "lineage": {"data": args.data, **metrics["lineage"]}, "random_init": random_init,
           "versions": run_versions(), "wall_time_s": round(time.perf_counter() - started, 3)}
    write_json(os.path.join(args.output, RUN_FILE), run)
    return run


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Console entry (``spatext train``): parse, check, dispatch to denoiser or prior training, print a summary line
    (the main process of a multi-process launch only).

    Every check that can fail on the flags alone runs before ``--output`` is created or touched; the run folder
    appears with the first file training writes. A resumed run already finished at ``--max-train-steps`` is left as
    it is (a message, exit 0).
    """
    command_logging()
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    prior = is_prior_config(args.config)
    check_local_output(args.output)  # both kinds write run.json with local file operations
    check_args(args, prior)
    checked = None if prior else preflight(args)
    main_process = int(os.environ.get("RANK", "0")) == 0  # torchrun / accelerate launch: rank 0 speaks for the run
    if checked is not None and checked.finished is not None:
        if main_process:
            print(f"spatext train: {args.output} is already finished at step {args.max_train_steps} "
                  "(--max-train-steps): nothing to train, nothing rewritten; pass a larger --max-train-steps to go on")
        return 0
    with folder_lock(args.output, "--output") if main_process else contextlib.nullcontext():
        run = train_prior_run(args) if prior else train(args, checked)
    if not main_process:
        return 0
    if run.get("lineage", {}).get("random_init"):
        logger.warning("random weights in this run: %s", ", ".join(run["lineage"]["random_init"]))
    print(f"spatext train: {run['kind']} {args.config} -> {args.output} (step {run['global_step']}, "
          f"{run.get('wall_time_s')} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
