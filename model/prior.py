"""Prior P: CLIP text embedding -> CLIP image embedding, so that local prompts can be painted into ST at inference.

The model is a residual MLP on the unit-normalised text embedding whose output layer starts at zero, so an untrained
prior is the identity (the "no prior" baseline) and training can only move away from it where the data says so:
P(t) = normalize(t + W_out(LN(MLP_blocks(W_in t)))). It is trained with the cosine loss on the shards'
(caption_embedding, image_embedding) pairs; the held-out split is a hash of the key (independent of the seed), and
the metrics compare the held-out mean cosine of P(text) and of the text itself (identity) to the true image
embedding, plus the trivial "mean training image embedding" baseline. All pairs are held in memory (float16).

    python -m spatext.model.prior --data build/ --output prior/ --config prior-tiny --steps 500
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import logging
import math
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import fsspec
import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from spatext.device import check_device
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

CONFIG_DIR = Path(__file__).parent / "configs"
CONFIG_PREFIX = "prior-"
WEIGHTS_FILE = "prior.safetensors"
CONFIG_FILE = "prior_config.json"
METRICS_FILE = "prior_metrics.json"


@dataclass
class PriorConfig:
    """One prior architecture (a residual MLP); embed_dim None means "the training shards' embed_dim"."""

    name: str = "custom"
    embed_dim: int | None = None
    hidden_dim: int = 512
    num_layers: int = 2
    expansion: int = 2  # inner width of each block = expansion * hidden_dim
    dropout: float = 0.0

    def __post_init__(self) -> None:
        """Reject invalid values, naming the config and the key."""
        where = f"prior config {self.name!r}"
        if self.embed_dim is not None and int(self.embed_dim) < 1:
            raise ValueError(f"{where}: embed_dim must be >= 1 or null, got {self.embed_dim}")
        for key in ("hidden_dim", "expansion"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{where}: {key} must be >= 1, got {getattr(self, key)}")
        if int(self.num_layers) < 0:
            raise ValueError(f"{where}: num_layers must be >= 0, got {self.num_layers}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"{where}: dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        """A JSON-ready copy."""
        return dataclasses.asdict(self)


def list_prior_configs() -> list[str]:
    """Names of the bundled prior configs (stems of configs/prior-*.json), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob(f"{CONFIG_PREFIX}*.json"))


def prior_config_from_dict(data: dict, name: str = "custom") -> PriorConfig:
    """A PriorConfig from a dict with the dataclass's keys; unknown keys are an error."""
    known = {f.name for f in dataclasses.fields(PriorConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"prior config {name!r}: unknown keys {unknown}; known keys: {', '.join(sorted(known))}")
    return PriorConfig(**{"name": name, **copy.deepcopy(data)})


def load_prior_config(name_or_path: str) -> PriorConfig:
    """A fresh copy of a bundled prior config (by name, e.g. 'prior-tiny') or of a JSON file with the same keys."""
    if name_or_path in list_prior_configs():
        path, name = CONFIG_DIR / f"{name_or_path}.json", name_or_path
    elif name_or_path.endswith(".json") and os.path.isfile(name_or_path):
        path, name = Path(name_or_path), Path(name_or_path).stem
    else:
        raise ValueError(f"config {name_or_path!r} is neither a bundled prior config "
                         f"({', '.join(list_prior_configs())}) nor a JSON file")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"config {name_or_path!r}: expected a JSON object, got {type(data).__name__}")
    return prior_config_from_dict({k: v for k, v in data.items() if k != "name"}, name=data.get("name", name))


class _Block(nn.Module):
    """Pre-norm residual MLP block."""

    def __init__(self, width: int, expansion: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width * expansion)
        self.fc2 = nn.Linear(width * expansion, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + MLP(LN(x))."""
        return x + self.fc2(self.dropout(F.gelu(self.fc1(self.norm(x)))))


class Prior(nn.Module):
    """Text embedding (B x D) -> predicted image embedding (B x D, unit norm); the identity at initialisation."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        if config.embed_dim is None:
            raise ValueError(f"prior config {config.name!r}: embed_dim is null; set it (train_prior does, from data)")
        self.config = config
        dim, width = int(config.embed_dim), int(config.hidden_dim)
        self.proj_in = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(_Block(width, int(config.expansion), float(config.dropout))
                                    for _ in range(int(config.num_layers)))
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, dim)
        nn.init.zeros_(self.proj_out.weight)  # start as the identity prior
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """normalize(t + residual(t)) for the unit-normalised text embedding t."""
        if text_embeddings.dim() != 2 or text_embeddings.shape[1] != self.proj_in.in_features:
            raise ValueError(f"text_embeddings must be B x {self.proj_in.in_features}, "
                             f"got {tuple(text_embeddings.shape)}")
        text = F.normalize(text_embeddings.to(self.proj_in.weight.dtype), dim=-1)
        hidden = self.proj_in(text)
        for block in self.blocks:
            hidden = block(hidden)
        return F.normalize(text + self.proj_out(self.norm(hidden)), dim=-1)


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


@torch.no_grad()
def predict(prior: Prior, text: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Prior outputs for many rows, in batches, in eval mode (float32, on the prior's device)."""
    device = prior.proj_in.weight.device
    was_training = prior.training
    prior.eval()
    out = [prior(text[i : i + batch_size].to(device).float()) for i in range(0, len(text), batch_size)]
    prior.train(was_training)
    return torch.cat(out) if out else text.new_zeros(0, text.shape[1]).float()


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


def _write(path: str, data: bytes) -> None:
    """Write bytes to any fsspec path."""
    with fsspec.open(path, "wb") as handle:
        handle.write(data)


def save_prior(prior: Prior, output: str, metrics: dict | None = None) -> None:
    """Write output/prior.safetensors (config JSON in its metadata), prior_config.json and prior_metrics.json."""
    fs, path = fsspec.core.url_to_fs(output)
    fs.makedirs(path, exist_ok=True)
    config_json = json.dumps(prior.config.to_dict(), indent=2, sort_keys=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in prior.state_dict().items()}
    metadata = {"config": config_json}
    if metrics is not None and metrics.get("lineage"):  # which CLIP space it maps within, also in the file alone
        metadata["lineage"] = json.dumps(metrics["lineage"], sort_keys=True)
    _write(f"{output.rstrip('/')}/{WEIGHTS_FILE}", safetensors.torch.save(tensors, metadata=metadata))
    _write(f"{output.rstrip('/')}/{CONFIG_FILE}", config_json.encode())
    if metrics is not None:
        _write(f"{output.rstrip('/')}/{METRICS_FILE}", json.dumps(metrics, indent=2, sort_keys=True).encode())


def prior_file(output_or_file: str) -> str:
    """The prior's weights file: the given ``.safetensors`` file, or the one in a train_prior output folder."""
    return output_or_file if output_or_file.endswith(".safetensors") else f"{output_or_file.rstrip('/')}/{WEIGHTS_FILE}"


def _safetensors_metadata(handle: IO[bytes]) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, from its header only (8-byte little-endian length, then JSON): a
    remote prior's lineage is read without downloading its weights."""
    (length,) = struct.unpack("<Q", handle.read(8))
    return json.loads(handle.read(length)).get("__metadata__", {})


def load_prior_lineage(output_or_file: str) -> dict:
    """The lineage a trained prior was saved with (``clip_model``, ``clip_pretrained``, ``embed_dim``, ...): from
    its safetensors metadata, else from the ``prior_metrics.json`` beside it; {} when neither has one."""
    path = prior_file(output_or_file)
    with fsspec.open(path, "rb") as handle:
        meta = _safetensors_metadata(handle)
    if "lineage" in meta:
        return json.loads(meta["lineage"])
    metrics = f"{path.rsplit('/', 1)[0]}/{METRICS_FILE}" if "/" in path else METRICS_FILE
    fs, metrics_path = fsspec.core.url_to_fs(metrics)
    if fs.exists(metrics_path):
        with fs.open(metrics_path, "r") as handle:
            return json.load(handle).get("lineage") or {}
    return {}


def load_prior(output_or_file: str, device: str = "cpu") -> Prior:
    """Load a trained prior from a train_prior output dir or its .safetensors file (safetensors only; no pickle)."""
    path = prior_file(output_or_file)
    with fsspec.open(path, "rb") as handle:
        data = handle.read()
    meta = _safetensors_metadata(io.BytesIO(data))
    if "config" not in meta:
        raise ValueError(f"{path!r} carries no prior config in its safetensors metadata; not a spatext prior")
    cfg_dict = json.loads(meta["config"])
    config = prior_config_from_dict({k: v for k, v in cfg_dict.items() if k != "name"}, cfg_dict.get("name", "custom"))
    prior = Prior(config)
    prior.load_state_dict(safetensors.torch.load(data), strict=True)
    return prior.to(device).eval()


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """Flags of ``spatext train-prior`` (``python -m spatext.model.prior``)."""
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


def check_prior_output(output: str, overwrite: bool = False) -> None:
    """ValueError when `output` already holds a prior and `overwrite` is not set: runs trained with it name it by
    that folder (--prior), so replacing it silently would make their lineage name another model."""
    fs, path = fsspec.core.url_to_fs(f"{output.rstrip('/')}/{WEIGHTS_FILE}")
    if not overwrite and fs.exists(path):
        raise ValueError(f"--output {output!r} already holds a prior ({WEIGHTS_FILE}); runs trained with it name it as "
                         "their --prior: choose another --output, or pass --overwrite to replace it")


def main(argv: list[str] | None = None) -> int:
    """Console entry: train, write the outputs, log the held-out numbers."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    args = parse_args(argv)
    if args.device is not None:
        check_device(args.device)
    check_prior_output(args.output, args.overwrite)
    train_prior(args.data, args.output, args.config, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                seed=args.seed, val_fraction=args.val_fraction, device=args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
