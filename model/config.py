"""Denoiser architecture configs: one small JSON per architecture in ``configs/``, loaded into a dataclass.

``list_configs()`` names the bundled configs (file stems); ``get_config(name_or_path)`` returns a fresh copy of one,
or reads a JSON file with the same keys. Variants are configs, not forked code: ``latent`` is a Stable-Diffusion-style
UNet on VAE latents, ``pixel`` a DALL-E-2-style 64 px decoder on pixels; both take ST as extra input channels.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"
VARIANTS = ("latent", "pixel")
TEXT_SOURCES = ("base-model",)
SCHEDULERS = (
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"
)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class DenoiserConfig:
    """One denoiser architecture: what it sees (sample, ST, text, image embedding) and its diffusers UNet kwargs."""

    name: str = "custom"
    variant: str = "latent"  # "latent" (SD-style, on VAE latents) | "pixel" (DALL-E-2-style decoder, on pixels)
    resolution: int = 512  # output image size in pixels
    sample_size: int = 64  # the UNet's spatial size: resolution / VAE factor (latent) or resolution (pixel)
    sample_channels: int = 4  # latent channels (latent) or 3 (pixel); the UNet's input is these + embed_dim (ST)
    embed_dim: int = 768  # D: CLIP embedding size = ST channels (= the image-embedding input of the pixel variant)
    clip_model: str = "ViT-L-14"  # the open_clip architecture whose embeddings fill ST (fixes embed_dim)
    text_source: str = "base-model"  # global-prompt tokens: the base model's CLIPTextModel + CLIPTokenizer
    text_embed_dim: int = 768  # hidden size of that text encoder (= cross_attention_dim of the latent UNet)
    prediction_type: str = "epsilon"
    scheduler: str = "DDIMScheduler"  # a diffusers scheduler class (used when the base model brings none)
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    unet: dict[str, Any] = field(default_factory=dict)  # UNet2DConditionModel kwargs (block_out_channels, ...)

    def __post_init__(self) -> None:
        """Reject invalid values, naming the config and the key."""
        where = f"--config {self.name!r}"
        _check_choice(where, "variant", self.variant, VARIANTS)
        _check_choice(where, "text_source", self.text_source, TEXT_SOURCES)
        _check_choice(where, "scheduler", self.scheduler, SCHEDULERS)
        _check_choice(where, "prediction_type", self.prediction_type, PREDICTION_TYPES)
        for key in ("resolution", "sample_size", "sample_channels", "embed_dim", "text_embed_dim"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{where}: {key} must be >= 1, got {getattr(self, key)}")
        if self.variant == "pixel" and self.sample_size != self.resolution:
            raise ValueError(f"{where}: a pixel denoiser has sample_size == resolution, got {self.sample_size}")
        if self.resolution % self.sample_size:
            raise ValueError(f"{where}: resolution {self.resolution} is not a multiple of sample_size")
        forbidden = {"in_channels", "out_channels", "sample_size"} & set(self.unet)
        if forbidden:
            raise ValueError(f"{where}: unet must not set {sorted(forbidden)} (they follow from the config)")

    @property
    def in_channels(self) -> int:
        """Input channels of the SpaText UNet: the sample's channels followed by the D channels of ST."""
        return self.sample_channels + self.embed_dim

    def unet_kwargs(self) -> dict[str, Any]:
        """``UNet2DConditionModel`` kwargs of the base network (no ST channels yet; ``extend_conv_in`` adds them)."""
        kwargs = copy.deepcopy(self.unet)
        kwargs.update(sample_size=self.sample_size, in_channels=self.sample_channels, out_channels=self.sample_channels)
        if self.variant == "latent":
            kwargs.setdefault("cross_attention_dim", self.text_embed_dim)
        else:  # DALL-E 2 style: the CLIP image embedding is projected into the time embedding; text via cross-attn
            kwargs.update(class_embed_type="projection", projection_class_embeddings_input_dim=self.embed_dim)
            kwargs.update(encoder_hid_dim=self.text_embed_dim, encoder_hid_dim_type="text_proj")
        return kwargs

    def scheduler_config(self) -> dict[str, Any]:
        """Kwargs of the scheduler used when the base model brings none."""
        return {**self.scheduler_kwargs, "prediction_type": self.prediction_type}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return dataclasses.asdict(self)


def _check_choice(where: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming the config and key when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{where}: {key} must be one of {', '.join(choices)}; got {value!r}")


def list_configs() -> list[str]:
    """Names of the bundled denoiser configs (the stems of ``configs/*.json``; ``prior-*`` are the prior's), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json") if not p.stem.startswith("prior-"))


def config_from_dict(data: dict[str, Any], name: str = "custom") -> DenoiserConfig:
    """Build a config from a dict with the dataclass's keys; unknown keys are an error."""
    known = {f.name for f in dataclasses.fields(DenoiserConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--config {name!r}: unknown keys {unknown}; known keys: {', '.join(sorted(known))}")
    return DenoiserConfig(**{"name": name, **copy.deepcopy(data)})


def get_config(name_or_path: str) -> DenoiserConfig:
    """A fresh copy of a bundled config (by name) or of a JSON file with the same keys."""
    if name_or_path in list_configs():
        path, name = CONFIG_DIR / f"{name_or_path}.json", name_or_path
    elif name_or_path.endswith(".json") and os.path.isfile(name_or_path):
        path, name = Path(name_or_path), Path(name_or_path).stem
    else:
        raise ValueError(
            f"--config {name_or_path!r} is neither a bundled config ({', '.join(list_configs())}) nor a JSON file"
        )
    return config_from_dict(read_config_json(path, name_or_path), name=name)


def read_config_json(path: str | Path, name_or_path: str) -> dict:
    """The JSON object of a config file (denoiser or prior); ValueError naming ``--config`` and the file when it is
    unreadable, not JSON or not an object (a bare JSONDecodeError named neither)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise ValueError(f"--config {name_or_path!r}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"--config {name_or_path!r}: expected a JSON object, got {type(data).__name__}")
    return data
