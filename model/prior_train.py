"""Training the prior P (``spatext train-prior``): the shards' (caption_embedding, image_embedding) pairs, a held-out
split by a hash of the key (independent of the seed), AdamW with the cosine loss, and the held-out metrics: mean
cosine of P(text), of the text itself (identity) and of the mean training image embedding to the true image
embedding. All pairs are held in memory (float16). The model and its files: ``prior.py``.

    python -m spatext.model.prior_train --data build/ --output prior/ --config prior-tiny --steps 500
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from spatext.device import check_device
from spatext.locks import folder_lock
from spatext.model.checkpoint import DivergedError
from spatext.model.prior import (
    Prior,
    PriorConfig,
    check_prior_output,
    list_prior_configs,
    load_prior_config,
    predict,
    save_prior,
)
from spatext.model.shard_files import (
    WorkUnit,
    check_metadata,
    fixed_lists,
    read_footers,
    read_unit,
    resolve_files,
)
from spatext.pipeline.keys import key_hash

logger = logging.getLogger(__name__)

@dataclass
class EmbeddingPairs:
    """(caption_embedding, image_embedding) rows of a set of shards, float16, with their keys and metadata."""

    keys: list[str]
    text: np.ndarray  # N x D float16
    image: np.ndarray  # N x D float16
    metadata: dict[str, str]
    files: list[str] = field(default_factory=list)  # the shards the rows came from


def load_embedding_pairs(data: str | list[str], storage_options: dict | None = None) -> EmbeddingPairs:
    """Read only the key and the two embedding columns of every row of `data` (any fsspec path)."""
    files = resolve_files(data, storage_options)
    footers = read_footers(files, storage_options)
    metadata = check_metadata(data, [meta for _, meta in footers])
    keys, text, image = [], [], []
    columns = ["key", "caption_embedding", "image_embedding"]
    for path, (rows, _) in zip(files, footers, strict=True):
        for group, count in enumerate(rows):
            if count:
                table = read_unit(WorkUnit(path, group, 0, count), storage_options, columns=columns)
                keys.extend(table.column("key").to_pylist())
                text.append(fixed_lists(table.column("caption_embedding"), count))
                image.append(fixed_lists(table.column("image_embedding"), count))
    dim = int(metadata["embed_dim"])
    empty = np.zeros((0, dim), dtype=np.float16)
    return EmbeddingPairs(keys, np.concatenate(text) if text else empty, np.concatenate(image) if image else empty,
                          metadata, files)


def heldout_mask(keys: list[str], fraction: float) -> np.ndarray:
    """Which keys are held out: a hash of the key below `fraction` (the same split for every seed and run). With a
    fraction > 0 and at least two keys, at least one is held out (the one of smallest hash): on a small build the
    hash can leave none, and the held-out metrics would be empty."""
    scale = 1 << 32
    hashes = np.array([key_hash(key) % scale for key in keys], dtype=np.int64)
    held = hashes < fraction * scale
    if fraction > 0 and len(keys) >= 2 and not held.any():
        held[np.argmin(hashes)] = True
    return held


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows."""
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean()) if len(a) else float("nan")


# How `_fit` trains, for the run's record (the denoiser's --lr-scheduler / --max-grad-norm / --ema-decay do not apply).
OPTIMIZATION = ("AdamW (weight decay 0.01); learning rate: linear warm-up over the first 5% of steps, then cosine "
                "decay to 0; no gradient clipping; no EMA")


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to zero."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _fit(prior: Prior, text: torch.Tensor, image: torch.Tensor, steps: int, batch_size: int, lr: float,
         seed: int) -> float:
    """Train with the cosine loss on random permutations of the rows; returns the last step's loss."""
    device = prior.proj_in.weight.device
    optimizer = torch.optim.AdamW(prior.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    order, cursor, loss = torch.randperm(len(text), generator=generator), 0, torch.tensor(float("nan"))
    prior.train()
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(text), generator=generator), 0
        index = order[cursor : cursor + batch_size]
        cursor += batch_size
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        pred = prior(text[index].to(device).float())
        loss = (1 - F.cosine_similarity(pred, image[index].to(device).float(), dim=-1)).mean()
        if not torch.isfinite(loss):  # nothing is saved of a diverged prior (see check_finite_loss)
            raise DivergedError(f"the prior's loss is {float(loss.detach())} at step {step + 1}: training diverged "
                                f"(with --lr {lr:g}); nothing was saved: train again with a lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def _resolve_config(config: str | PriorConfig, embed_dim: int) -> PriorConfig:
    """The config with embed_dim set from the data (an explicit, different value is an error)."""
    cfg = copy.deepcopy(config) if isinstance(config, PriorConfig) else load_prior_config(config)
    if cfg.embed_dim is not None and int(cfg.embed_dim) != embed_dim:
        raise ValueError(f"prior config {cfg.name!r} has embed_dim={cfg.embed_dim} but the shards have {embed_dim}")
    cfg.embed_dim = embed_dim
    return cfg


def _evaluate(prior: Prior, text: torch.Tensor, image: torch.Tensor, mean_image: torch.Tensor) -> dict:
    """Mean cosines to the true image embedding: prior, identity, and the mean training image embedding."""
    return {
        "prior_cosine": mean_cosine(predict(prior, text).cpu(), image),
        "identity_cosine": mean_cosine(text, image),
        "mean_image_cosine": mean_cosine(mean_image.expand_as(image), image),
    }


def train_prior(
    data: str, output: str, config: str | PriorConfig = "prior-tiny", *, steps: int = 500, batch_size: int = 256,
    lr: float = 1e-3, seed: int = 0, val_fraction: float = 0.1, device: str | None = None,
    storage_options: dict | None = None,
) -> dict:
    """Trains on (caption_embedding, image_embedding) rows (held-out split by a hash of the key), writes
    output/prior.safetensors + output/prior_config.json + output/prior_metrics.json, returns the metrics:
    held-out mean cosine(prior(text), image) vs the identity baseline mean cosine(text, image)."""
    if steps < 1 or batch_size < 1 or lr <= 0 or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"need steps >= 1, batch_size >= 1, lr > 0, 0 <= val_fraction < 1; got steps={steps}, "
                         f"batch_size={batch_size}, lr={lr}, val_fraction={val_fraction}")
    started = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pairs = load_embedding_pairs(data, storage_options)
    cfg = _resolve_config(config, int(pairs.metadata["embed_dim"]))
    held = heldout_mask(pairs.keys, val_fraction)
    text, image = torch.from_numpy(pairs.text), torch.from_numpy(pairs.image)
    if not (~held).any():
        raise ValueError(f"data={data!r}: no training rows ({len(held)} rows, val_fraction={val_fraction})")
    if not held.any():
        logger.warning("prior: no held-out rows (%d rows, val_fraction=%s); held-out metrics are null", len(held),
                       val_fraction)
    logger.info("prior: config %s, %d train / %d held-out rows, D=%d, %d steps on %s", json.dumps(cfg.to_dict()),
                int((~held).sum()), int(held.sum()), cfg.embed_dim, steps, device)
    torch.manual_seed(seed)
    prior = Prior(cfg).to(device)
    train_t, train_i = text[torch.from_numpy(~held)], image[torch.from_numpy(~held)]
    final_loss = _fit(prior, train_t, train_i, steps, batch_size, lr, seed)
    mean_image = F.normalize(train_i.float().mean(0, keepdim=True), dim=-1)
    heldout = _evaluate(prior, text[torch.from_numpy(held)], image[torch.from_numpy(held)], mean_image)
    train = _evaluate(prior, train_t[:20000], train_i[:20000], mean_image)
    metrics = {
        "heldout_prior_cosine": heldout["prior_cosine"], "heldout_identity_cosine": heldout["identity_cosine"],
        "heldout_mean_image_cosine": heldout["mean_image_cosine"],
        "heldout_gain_over_identity": heldout["prior_cosine"] - heldout["identity_cosine"],
        "train_prior_cosine": train["prior_cosine"], "train_identity_cosine": train["identity_cosine"],
        "final_train_loss": final_loss, "num_train": int((~held).sum()), "num_heldout": int(held.sum()),
        "steps": steps, "batch_size": batch_size, "batch_size_used": min(batch_size, int((~held).sum())),
        "optimization": OPTIMIZATION, "lr": lr, "seed": seed, "val_fraction": val_fraction,
        "device": device, "config": cfg.to_dict(), "wall_time_s": round(time.perf_counter() - started, 3),
        "data": data if isinstance(data, str) else list(data),
        "lineage": {**{k: pairs.metadata.get(k) for k in ("clip_model", "clip_pretrained", "embed_dim", "segmenter")},
                    "shard_files": pairs.files},
    }
    metrics = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}  # JSON
    save_prior(prior, output, metrics)
    logger.info("prior: held-out cosine %s (identity %s, mean image %s), wrote %s",
                *(_fmt4(metrics[k]) for k in ("heldout_prior_cosine", "heldout_identity_cosine",
                                              "heldout_mean_image_cosine")), output)
    return metrics


def _fmt4(value: float | None) -> str:
    """A metric with 4 decimals, or 'n/a' (no held-out rows)."""
    return "n/a" if value is None else f"{value:.4f}"


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """Flags of ``spatext train-prior`` (``python -m spatext.model.prior_train``)."""
    parser = argparse.ArgumentParser(
        prog="spatext train-prior", description="Train the prior P (CLIP text -> image embedding) on spatext shards"
    )
    parser.add_argument("--data", required=True, help="build dir, glob or Parquet file (any fsspec path)")
    parser.add_argument("--output", required=True, help="folder for prior.safetensors, prior_config.json, metrics")
    parser.add_argument("--config", default="prior-tiny",
                        help=f"bundled prior config ({', '.join(list_prior_configs())}) or a JSON file")
    # each also under the name `spatext train --config prior-*` gives it (one vocabulary for both commands)
    parser.add_argument("--steps", "--max-train-steps", dest="steps", type=int, default=500, help="optimizer steps")
    parser.add_argument("--batch-size", "--train-batch-size", dest="batch_size", type=int, default=256,
                        help="rows per step")
    parser.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=1e-3,
                        help="peak learning rate (AdamW, warm-up then cosine)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="held-out share, chosen by a hash of the key")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace a prior already in --output")
    return parser.parse_args(input_args)


def main(argv: list[str] | None = None) -> int:
    """Console entry: train, write the outputs, log the held-out numbers."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    args = parse_args(argv)
    if args.device is not None:
        check_device(args.device)
    check_prior_output(args.output, args.overwrite)
    with folder_lock(args.output, "--output"):
        train_prior(args.data, args.output, args.config, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    seed=args.seed, val_fraction=args.val_fraction, device=args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
