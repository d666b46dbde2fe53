"""What a ``spatext train`` run records about itself: run.json's content, package versions, and per rank the samples
it trained on and a fingerprint of its final weights.

Data-parallel lineage: every rank counts the samples it trains on, and with ``--log-sample-keys`` appends their keys to
``logs/keys-rank-R.csv`` (step, epoch, key); at the end the ranks' counts and SHA-256 fingerprints of their weights
go into run.json's ``ranks``. DDP keeps the replicas bit-identical, so differing fingerprints mean a broken run.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import platform

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object

from spatext.model.train_setup import Session
from spatext.versions import package_versions

logger = logging.getLogger(__name__)

PACKAGES = ("spatext", "torch", "diffusers", "transformers", "accelerate", "open_clip_torch", "safetensors", "pyarrow")
KEY_FIELDS = ("step", "epoch", "key")
SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)  # no full replica per rank


def run_versions() -> dict[str, str | None]:
    """Python's and the installed versions of the packages a run depends on (None: not installed; no git)."""
    return {"python": platform.python_version(), **package_versions(PACKAGES)}


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over (name, raw bytes) of every tensor, by name: equal exactly when the weights are bit-identical.

    Applied to a checkpoint's ``model.safetensors`` it gives the fingerprint rank 0 recorded for the same weights.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class SampleLedger:
    """The samples one rank trains on: a count (since step 0: a resumed run starts from the checkpoint's ``count``),
    and with ``--log-sample-keys`` one CSV row per sample."""

    def __init__(self, output: str, rank: int, enabled: bool, resume_step: int, count: int = 0) -> None:
        self.count = count
        self.path = os.path.join(output, "logs", f"keys-rank-{rank}.csv") if enabled else None
        if self.path is not None:
            self._reset(resume_step)

    def _reset(self, resume_step: int) -> None:
        """Start the file; on resume keep the rows up to the resumed step (later ones are redone)."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        rows = []
        if resume_step and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, KEY_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def add(self, step: int, epoch: int, keys: list[str]) -> None:
        """Record one micro-batch of the optimizer step ``step``."""
        self.count += len(keys)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8", newline="") as f:
                csv.writer(f).writerows((step, epoch, key) for key in keys)


def rank_report(acc: Accelerator, unet: torch.nn.Module, samples: int) -> dict:
    """run.json's ``ranks`` (a collective: every rank calls it): samples each rank trained on since step 0 (over
    every session of a resumed run), the fingerprint of its final weights (``None`` where a rank holds a shard, not a
    replica), and whether all replicas agree."""
    fingerprint = None if acc.distributed_type in SHARDED else weights_sha256(acc.unwrap_model(unet).state_dict())
    rows = sorted(gather_object([(acc.process_index, samples, fingerprint)]))  # one process: the list itself
    in_sync = len({f for _, _, f in rows}) == 1 if fingerprint is not None else None
    return {"samples": [n for _, n, _ in rows], "weights_sha256": [f for _, _, f in rows], "weights_in_sync": in_sync}


def run_record(s: Session, state: dict, status: str, elapsed: float, last_loss: float | None,
               ranks: dict | None = None) -> dict:
    """The content of run.json (``elapsed``: seconds of training since step 0, every session of a resumed run;
    ``ranks``: ``rank_report``'s, at the end of a run; ``None`` while in progress)."""
    return {
        "kind": "denoiser", "status": status, "global_step": state["global_step"], "epoch": state["epoch"],
        "max_train_steps": s.args.max_train_steps, "last_loss": last_loss, "config": s.config.to_dict(),
        "args": vars(s.args), "cwd": os.getcwd(), "lineage": s.lineage, "random_init": s.lineage["random_init"],
        "ema": s.ema is not None, "pipeline_weights": "EMA" if s.ema is not None else "trained",
        "accelerate": {"num_processes": s.accelerator.num_processes, "mixed_precision": s.args.mixed_precision,
                       "device": str(s.accelerator.device)},
        "ranks": ranks, "versions": run_versions(), "wall_time_s": round(elapsed, 3),
    }
