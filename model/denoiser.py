"""The SpaText denoisers: diffusers UNets whose ``conv_in`` takes the noisy sample followed by the D channels of ST.

- latent variant: the base model's ``UNet2DConditionModel`` (or a random one from the config), ``conv_in`` extended
  with D zero-initialised input channels, so that at step 0 it computes exactly what the base model computes;
- pixel variant: a DALL-E-2-style decoder on pixels, conditioned on the CLIP image embedding (projected into the time
  embedding, ``class_embed_type="projection"``) and on the global text (cross-attention), ST concatenated the same way.
"""

from __future__ import annotations

import logging

import torch
from diffusers import UNet2DConditionModel
from diffusers import schedulers as diffusers_schedulers
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from spatext.model.config import DenoiserConfig
from spatext.pipeline.clip import RANDOM_INIT_LABEL

logger = logging.getLogger(__name__)


def extend_conv_in(unet: UNet2DConditionModel, extra_channels: int) -> UNet2DConditionModel:
    """Give ``unet.conv_in`` ``extra_channels`` more inputs: old weights kept, new ones zero (in place; returned)."""
    if extra_channels < 1:
        raise ValueError(f"extra_channels must be >= 1, got {extra_channels}")
    old = unet.conv_in
    new = torch.nn.Conv2d(
        old.in_channels + extra_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels].copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=new.in_channels)
    return unet


def _random_unet(config: DenoiserConfig, seed: int) -> UNet2DConditionModel:
    """A randomly initialised base UNet of ``config`` (seeded), without ST channels."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**config.unet_kwargs())


def build_latent_denoiser(
    config: DenoiserConfig, base_model: str | None = None, seed: int = 0
) -> UNet2DConditionModel:
    """The latent SpaText UNet: ``base_model``'s ``unet/`` (diffusers layout) or a random one, plus ST channels."""
    if config.variant != "latent":
        raise ValueError(f"--config {config.name!r} is a {config.variant} config, not a latent one")
    if base_model is None:
        unet = _random_unet(config, seed)
        logger.warning("latent denoiser %s: pretrained: %s", config.name, RANDOM_INIT_LABEL)
    else:
        unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet")
        logger.info("latent denoiser %s: UNet from --base-model %s", config.name, base_model)
    if unet.config.in_channels != config.sample_channels:
        raise ValueError(
            f"--base-model {base_model!r}: its UNet takes {unet.config.in_channels} input channels, "
            f"--config {config.name!r} expects {config.sample_channels} latent channels"
        )
    if unet.config.cross_attention_dim != config.text_embed_dim:
        raise ValueError(
            f"--base-model {base_model!r}: cross_attention_dim {unet.config.cross_attention_dim} != "
            f"text_embed_dim {config.text_embed_dim} of --config {config.name!r}"
        )
    return extend_conv_in(unet, config.embed_dim)


def build_pixel_denoiser(config: DenoiserConfig, seed: int = 0) -> UNet2DConditionModel:
    """The pixel SpaText UNet (random init): DALL-E-2-style image-embedding conditioning, ST channels appended."""
    if config.variant != "pixel":
        raise ValueError(f"--config {config.name!r} is a {config.variant} config, not a pixel one")
    unet = _random_unet(config, seed)
    logger.warning("pixel denoiser %s: pretrained: %s", config.name, RANDOM_INIT_LABEL)
    return extend_conv_in(unet, config.embed_dim)


def build_denoiser(config: DenoiserConfig, base_model: str | None = None, seed: int = 0) -> UNet2DConditionModel:
    """The SpaText UNet of ``config``'s variant (the pixel variant never takes its UNet from a base model)."""
    if config.variant == "latent":
        return build_latent_denoiser(config, base_model, seed=seed)
    return build_pixel_denoiser(config, seed=seed)


def build_scheduler(config: DenoiserConfig, base_model: str | None = None) -> SchedulerMixin:
    """The noise scheduler: the latent base model's ``scheduler/`` when there is one, else the config's."""
    cls = getattr(diffusers_schedulers, config.scheduler)
    if base_model is not None and config.variant == "latent":
        try:
            return cls.from_pretrained(base_model, subfolder="scheduler")
        except OSError:
            logger.info("--base-model %s has no scheduler/; using the config's %s", base_model, config.scheduler)
    return cls(**config.scheduler_config())


def uses_image_embedding(unet: UNet2DConditionModel) -> bool:
    """Whether the UNet takes a CLIP image embedding as ``class_labels`` (the pixel variant)."""
    return unet.config.class_embed_type == "projection"


def predict(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    st: torch.Tensor,
    timestep: torch.Tensor | int,
    text: torch.Tensor,
    image: torch.Tensor | None = None,
) -> torch.Tensor:
    """One UNet forward: ``sample`` (B,C,h,w) and ``st`` (B,D,h,w) concatenated on channels, text (+ image emb)."""
    if st.shape[0] != sample.shape[0] or st.shape[-2:] != sample.shape[-2:]:
        raise ValueError(f"st must be (B, D, h, w) matching sample {tuple(sample.shape)}, got {tuple(st.shape)}")
    if uses_image_embedding(unet) and image is None:
        raise ValueError("image embedding required: this denoiser is conditioned on the CLIP image embedding")
    model_input = torch.cat([sample, st.to(sample.dtype)], dim=1)
    class_labels = image.to(sample.dtype) if uses_image_embedding(unet) else None
    return unet(model_input, timestep, encoder_hidden_states=text, class_labels=class_labels).sample
