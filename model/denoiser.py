"""The SpaText denoisers: diffusers UNets whose ``conv_in`` takes the noisy sample followed by the D channels of ST.

- latent variant: the base model's ``UNet2DConditionModel`` (or a random one from the config), ``conv_in`` extended
  with D zero-initialised input channels, so that at step 0 it computes exactly what the base model computes;
- pixel variant: a DALL-E-2-style decoder on pixels, conditioned on the CLIP image embedding (projected into the time
  embedding, ``class_embed_type="projection"``) and on the global text (cross-attention), ST concatenated the same way.

``predict`` runs one forward on the concatenated input. For sampling, ``cached_st`` uses that ``conv_in`` is linear:
conv_in([x; ST]) = conv(x; W_x) + conv(ST; W_ST) + b, and ST does not change over the denoising loop, so the ST term is
computed once per sampling call (``st_feature``) and each step convolves only the sample channels, as the base model
does.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
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
    model_input = torch.cat([sample, st.to(sample.dtype)], dim=1)
    return _forward(unet, model_input, timestep, text, image)


def _forward(
    unet: UNet2DConditionModel,
    model_input: torch.Tensor,
    timestep: torch.Tensor | int,
    text: torch.Tensor,
    image: torch.Tensor | None,
) -> torch.Tensor:
    """The UNet's noise prediction for ``model_input`` (whatever its ``conv_in`` takes), text (+ image embedding)."""
    if uses_image_embedding(unet) and image is None:
        raise ValueError("image embedding required: this denoiser is conditioned on the CLIP image embedding")
    class_labels = image.to(model_input.dtype) if uses_image_embedding(unet) else None
    return unet(model_input, timestep, encoder_hidden_states=text, class_labels=class_labels).sample


def _sample_channels(conv: torch.nn.Conv2d, st: torch.Tensor) -> int:
    """C, the sample channels of an ST-extended ``conv`` whose last D inputs take ``st`` (B x D x h x w)."""
    if st.dim() != 4 or st.shape[1] >= conv.in_channels:
        raise ValueError(f"st must be (B, D, h, w) with D < conv_in's {conv.in_channels} inputs, got {tuple(st.shape)}")
    return conv.in_channels - st.shape[1]


def st_feature(conv: torch.nn.Conv2d, st: torch.Tensor) -> torch.Tensor:
    """``conv``'s ST term plus its bias: b + conv(ST; W[:, C:]) (B x out x h' x w'), C = in_channels − D.

    ``conv`` is an ST-extended ``conv_in`` (sample channels first, then the D channels of ST). A row whose ST is all
    zero (a null-ST pass, a scene without regions) contributes exactly nothing, so only the other rows are convolved;
    zero rows get the bias alone.
    """
    channels = _sample_channels(conv, st)
    st = st.to(conv.weight.dtype)
    rows = st.flatten(1).any(dim=1)
    # the ST rows alone, without bias: conv over [x; ST] = conv over [x; 0] + conv over [0; ST] (zero padding too)
    term = F.conv2d(st[rows], conv.weight[:, channels:], None, conv.stride, conv.padding, conv.dilation)
    feature = term.new_zeros((st.shape[0], *term.shape[1:]))
    feature[rows] = term
    if conv.bias is not None:
        feature += conv.bias.view(1, -1, 1, 1)
    return feature


class STConvIn(torch.nn.Module):
    """An ST-extended ``conv_in`` that takes the sample channels only and adds a cached ST term.

    forward(x) = conv(x; W[:, :C]) + [b + conv(ST; W[:, C:])], the bracket computed by ``st_feature`` at the first
    forward (when the weights sit where the forward runs, e.g. under model CPU offload) and reused after that, as is
    the contiguous W[:, :C]: the weights must not change meanwhile (sampling, not training). The rows of ``st`` must be
    the rows every forward's sample will have (e.g. the batched guidance passes, [uncond, cond, ...]). Used by
    ``cached_st``; holds the original ``conv`` as a submodule (same parameters, no copy).
    """

    def __init__(self, conv: torch.nn.Conv2d, st: torch.Tensor):
        """Wrap ``conv`` (an ST-extended ``conv_in``) for the ST ``st`` (B x D x h x w)."""
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"conv_in must be an ungrouped zero-padded convolution to split off ST, got {conv}")
        self.conv = conv
        self.sample_channels = _sample_channels(conv, st)
        self._st: torch.Tensor | None = st
        self._feature: torch.Tensor | None = None
        self._sample_weight: torch.Tensor | None = None

    @property
    def feature(self) -> torch.Tensor | None:
        """The cached b + conv(ST; W_ST), or None before the first forward."""
        return self._feature

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        """conv(sample; W_x) + the cached ST term; ``sample`` is B x C x h x w with the rows of ``st``."""
        if sample.shape[1] != self.sample_channels:
            raise ValueError(f"sample must have the {self.sample_channels} sample channels (ST is cached), got "
                             f"{tuple(sample.shape)}")
        if self._feature is None:
            if self._st.shape[0] != sample.shape[0] or self._st.shape[-2:] != sample.shape[-2:]:
                raise ValueError(f"st {tuple(self._st.shape)} does not match the sample {tuple(sample.shape)}")
            self._feature = st_feature(self.conv, self._st.to(sample.dtype))
            self._sample_weight = self.conv.weight[:, : self.sample_channels].contiguous()
            self._st = None  # the feature is all the steps need
        if self._feature.shape[0] != sample.shape[0]:
            raise ValueError(f"sample has {sample.shape[0]} rows; the cached ST term has {self._feature.shape[0]}")
        conv = self.conv
        out = F.conv2d(sample, self._sample_weight, None, conv.stride, conv.padding, conv.dilation)
        return out.add_(self._feature)


@contextlib.contextmanager
def cached_st(unet: UNet2DConditionModel, st: torch.Tensor) -> Iterator[Callable[..., torch.Tensor]]:
    """Within the block, ``unet``'s ``conv_in`` is an ``STConvIn`` for ``st``; yields the predictor that uses it.

    The yielded ``predict_cached(sample, timestep, text, image=None)`` equals ``predict(unet, sample, st, timestep,
    text, image)`` up to float rounding, but convolves ST once for the whole block instead of once per call. ``st``
    (B x D x h x w) holds the rows of every ``sample`` given, in their order. ``unet.conv_in`` is restored when the
    block ends, also on an exception.
    """
    conv = unet.conv_in
    if isinstance(conv, STConvIn):
        raise ValueError("unet: its conv_in already caches an ST term (cached_st blocks do not nest)")
    unet.conv_in = STConvIn(conv, st)
    try:
        yield lambda sample, timestep, text, image=None: _forward(unet, sample, timestep, text, image)
    finally:
        unet.conv_in = conv
