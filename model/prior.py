"""Prior P: CLIP text embedding -> CLIP image embedding, so that local prompts can be painted into ST at inference.

The model is a residual MLP on the unit-normalised text embedding whose output layer starts at zero, so an untrained
prior is the identity (the "no prior" baseline) and training can only move away from it where the data says so:
P(t) = normalize(t + W_out(LN(MLP_blocks(W_in t)))). It is trained with the cosine loss on the shards'
(caption_embedding, image_embedding) pairs; the held-out split is a hash of the key (independent of the seed), and
the metrics compare the held-out mean cosine of P(text) and of the text itself (identity) to the true image
embedding, plus the trivial "mean training image embedding" baseline. Training: ``prior_train.py``
(``spatext train-prior``).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import fsspec
import safetensors.torch
import torch
import torch.nn.functional as F
from fsspec.implementations.local import LocalFileSystem
from torch import nn

from spatext.model.config import read_config_json
from spatext.pipeline.weights import safetensors_bytes

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
    data = read_config_json(path, name_or_path)
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


@torch.no_grad()
def predict(prior: Prior, text: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Prior outputs for many rows, in batches, in eval mode (float32, on the prior's device)."""
    device = prior.proj_in.weight.device
    was_training = prior.training
    prior.eval()
    out = [prior(text[i : i + batch_size].to(device).float()) for i in range(0, len(text), batch_size)]
    prior.train(was_training)
    return torch.cat(out) if out else text.new_zeros(0, text.shape[1]).float()


def _write(path: str, data: bytes) -> None:
    """Write bytes to any fsspec path. A local file goes through a temporary name and a rename, so that a save cut
    short (a kill, a full disk) leaves the previous file or none, never a partial one that a later --prior would
    load; an object store writes the object whole when it is closed, and its move would be a copy."""
    fs, target = fsspec.core.url_to_fs(path)
    if not isinstance(fs, LocalFileSystem):
        with fs.open(target, "wb") as handle:
            handle.write(data)
        return
    tmp = f"{target}.tmp"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_prior(prior: Prior, output: str, metrics: dict | None = None) -> None:
    """Write output/prior.safetensors (config JSON in its metadata), prior_config.json and prior_metrics.json."""
    fs, path = fsspec.core.url_to_fs(output)
    fs.makedirs(path, exist_ok=True)
    config_json = json.dumps(prior.config.to_dict(), indent=2, sort_keys=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in prior.state_dict().items()}
    metadata = {"config": config_json}
    if metrics is not None and metrics.get("lineage"):  # which CLIP space it maps within, also in the file alone
        metadata["lineage"] = json.dumps(metrics["lineage"], sort_keys=True)
    _write(f"{output.rstrip('/')}/{WEIGHTS_FILE}", safetensors_bytes(tensors, metadata))
    _write(f"{output.rstrip('/')}/{CONFIG_FILE}", config_json.encode())
    if metrics is not None:
        _write(f"{output.rstrip('/')}/{METRICS_FILE}", json.dumps(metrics, indent=2, sort_keys=True).encode())


def prior_file(output_or_file: str) -> str:
    """The prior's weights file: the given ``.safetensors`` file, or the one in a train_prior output folder."""
    return output_or_file if output_or_file.endswith(".safetensors") else f"{output_or_file.rstrip('/')}/{WEIGHTS_FILE}"


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


def _safetensors_metadata(handle: IO[bytes], path: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, from its header only (8-byte little-endian length, then JSON): a
    remote prior's lineage is read without downloading its weights. ValueError naming `path` for a file that is no
    safetensors file (too short, a header cut off or not JSON): a save killed half-way, or another format."""
    start = handle.read(8)
    length = struct.unpack("<Q", start)[0] if len(start) == 8 else None
    if length is None or length > MAX_HEADER_BYTES:
        raise ValueError(f"{path!r} is not a safetensors file (its header is missing or damaged)")
    header = handle.read(length)
    try:
        parsed = json.loads(header) if len(header) == length else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        parsed = None
    if not isinstance(parsed, dict):
        raise ValueError(f"{path!r} is not a safetensors file (its header is cut off or not JSON)")
    meta = parsed.get("__metadata__", {})
    return meta if isinstance(meta, dict) else {}


def load_prior_lineage(output_or_file: str) -> dict:
    """The lineage a trained prior was saved with (``clip_model``, ``clip_pretrained``, ``embed_dim``, ...): from
    its safetensors metadata, else from the ``prior_metrics.json`` beside it; {} when neither has one."""
    path = prior_file(output_or_file)
    with fsspec.open(path, "rb") as handle:
        meta = _safetensors_metadata(handle, path)
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
    meta = _safetensors_metadata(io.BytesIO(data), path)
    if "config" not in meta:
        raise ValueError(f"{path!r} carries no prior config in its safetensors metadata; not a spatext prior")
    cfg_dict = json.loads(meta["config"])
    config = prior_config_from_dict({k: v for k, v in cfg_dict.items() if k != "name"}, cfg_dict.get("name", "custom"))
    prior = Prior(config)
    try:
        tensors = safetensors.torch.load(data)
    except safetensors.SafetensorError as exc:  # the tensors are cut off or damaged (not an OSError or ValueError)
        raise ValueError(f"{path!r} is a damaged safetensors file ({exc})") from exc
    prior.load_state_dict(tensors, strict=True)
    return prior.to(device).eval()


def check_prior_output(output: str, overwrite: bool = False) -> None:
    """ValueError when `output` already holds a prior and `overwrite` is not set: runs trained with it name it by
    that folder (--prior), so replacing it silently would make their lineage name another model."""
    fs, path = fsspec.core.url_to_fs(f"{output.rstrip('/')}/{WEIGHTS_FILE}")
    if not overwrite and fs.exists(path):
        raise ValueError(f"--output {output!r} already holds a prior ({WEIGHTS_FILE}); runs trained with it name it as "
                         "their --prior: choose another --output, or pass --overwrite to replace it")
