"""Training-free baselines on a Stable-Diffusion-like base model (DESIGN.md, "Baselines").

- ``global-only``: plain text-to-image with the global prompt.
- ``concat`` (Make-A-Scene-adapted): the local prompts appended to the global prompt,
  ``global + ", " + ", ".join(local prompts)`` (``concat_prompt``); the masks are not used. When that exceeds the
  text encoder's token limit, the global prompt is shortened word by word from its end (``fit_prompt``, logged) so
  that the local prompts are never truncated away.
- ``ntlb`` (No-Token-Left-Behind-style): the ``concat`` prompt, and at each of the first ``ntlb_steps`` denoising
  steps (default: the first half), ``ntlb_iterations`` gradient steps on the latents that push each local prompt's
  cross-attention mass inside its mask, then the regular classifier-free-guided scheduler step. The loss
  (``attention_loss``) is

  .. math:: L = \\sum_r 1 - \\frac{\\sum_{p} m_r(p) A_r(p)}{\\sum_p A_r(p)}

  with ``A_r(p)`` the cross-attention probability of pixel p on region r's tokens (summed over its tokens, averaged
  over heads and over every recorded cross-attention layer) and ``m_r`` the region's mask area-downsampled to the
  layer's resolution. The attention is recorded by ``AttentionRecorder`` processors installed with
  ``unet.set_attn_processor`` for the duration of the call (``recording_attention``, which restores the previous
  processors). Token positions of each local prompt inside the concatenated prompt come from the tokenizer
  (``token_positions``, searched after the global prompt's tokens).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import Attention

from spatext.eval.outputs import to_uint8
from spatext.model.guidance import joint_cfg

logger = logging.getLogger(__name__)


def concat_prompt(prompt: str, local_prompts: Sequence[str]) -> str:
    """The Make-A-Scene-adapted prompt: ``global, local 1, local 2, ...`` (the global prompt alone when none)."""
    return ", ".join([prompt, *local_prompts]) if local_prompts else prompt


def fit_prompt(tokenizer: object, prompt: str, local_prompts: Sequence[str]) -> str:
    """The global prompt, shortened word by word from its end until ``concat_prompt`` fits the token limit.

    The appended local prompts are what ``concat`` and ``ntlb`` are about, so they must not be cut off by the text
    encoder's limit (77 tokens for CLIP); the global prompt gives way instead (logged). ValueError when even the local
    prompts alone do not fit.
    """
    limit = tokenizer.model_max_length - 2  # the start and end tokens

    def length(text: str) -> int:
        """Token count of ``text`` without the special tokens."""
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    words = prompt.split()
    while words and length(concat_prompt(" ".join(words), local_prompts)) > limit:
        words.pop()
    fitted = " ".join(words)
    if length(concat_prompt(fitted, local_prompts)) > limit:
        raise ValueError(f"the local prompts {list(local_prompts)} alone exceed the text encoder's {limit} tokens")
    if fitted != prompt.strip():
        logger.warning("global prompt shortened to fit the local prompts in %d tokens: %r", limit, fitted)
    return fitted


def load_base_pipeline(base_model: str, device: str = "cpu") -> StableDiffusionPipeline:
    """``StableDiffusionPipeline.from_pretrained(base_model)`` (no safety checker), progress bar off, on ``device``;
    ValueError naming ``--base-model`` when the folder holds no such pipeline (e.g. a SpaText run)."""
    check_base_model_folder(base_model)
    pipe = StableDiffusionPipeline.from_pretrained(base_model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def check_base_model_folder(base_model: str) -> None:
    """ValueError (naming --base-model) unless ``base_model`` is a local folder of a Stable-Diffusion-like pipeline,
    or a hub name (no local folder of that name); a SpaText run is named as such."""
    from spatext.model.pipeline import SpaTextPipeline, saved_pipeline_class  # lazy: open_clip and the prior

    run = os.path.isfile(os.path.join(base_model, "run.json")) or os.path.isdir(os.path.join(base_model, "pipeline"))
    kind = saved_pipeline_class(base_model)
    if run or kind == SpaTextPipeline.__name__:
        raise ValueError(f"--base-model {base_model!r} is a SpaText run (spatext train --output); baselines take "
                         "a Stable-Diffusion-like diffusers folder (e.g. the run's base model, or spatext "
                         "tiny-base-model DIR); use --method spatext --run for the run")
    if os.path.isdir(base_model) and kind is None:
        raise ValueError(f"--base-model {base_model!r} holds no model_index.json: not a diffusers pipeline folder")


def model_size(pipe: StableDiffusionPipeline) -> tuple[int, int]:
    """The base model's default image size (height, width): UNet sample size times the VAE factor."""
    size = pipe.unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return size[0] * pipe.vae_scale_factor, size[1] * pipe.vae_scale_factor


def token_positions(tokenizer: object, prompt: str, local_prompts: Sequence[str]) -> list[list[int]]:
    """Positions of each local prompt's tokens inside the tokenized ``concat_prompt(prompt, local_prompts)``.

    The search starts after the global prompt's tokens and goes left to right, so a word that also occurs in the
    global prompt maps to its appended copy. Raises ValueError when a local prompt's tokens are not found (e.g. cut
    off by the 77-token limit).
    """
    full = concat_prompt(prompt, local_prompts)
    ids = tokenizer(full, truncation=True, max_length=tokenizer.model_max_length).input_ids
    positions, start = [], 1 + len(tokenizer(prompt, add_special_tokens=False).input_ids)  # 0 is the start token
    for local in local_prompts:
        sub = tokenizer(local, add_special_tokens=False).input_ids
        found = next((i for i in range(start, len(ids) - len(sub) + 1) if ids[i : i + len(sub)] == sub), None)
        if not sub or found is None:
            raise ValueError(f"ntlb: local prompt {local!r} has no tokens inside the (truncated) prompt {full!r}")
        positions.append(list(range(found, found + len(sub))))
        start = found + len(sub)
    return positions


@dataclass
class AttentionStore:
    """Cross-attention probabilities recorded while ``active``: one B x Q x T tensor (head mean) per layer call."""

    active: bool = False
    maps: list[torch.Tensor] = field(default_factory=list)


class AttentionRecorder:
    """An attention processor that records cross-attention probabilities, then runs the wrapped processor."""

    def __init__(self, inner: object, store: AttentionStore) -> None:
        """Wrap ``inner`` (the processor it replaces) and record into ``store``."""
        self.inner = inner
        self.store = store

    def __call__(
        self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, *args: object, **kwargs: object,
    ) -> torch.Tensor:
        """Record softmax(QK^T / sqrt(d)) of a cross-attention call (head mean); return the inner processor's output."""
        if self.store.active and encoder_hidden_states is not None and hidden_states.ndim == 3:
            context = encoder_hidden_states
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            query = attn.head_to_batch_dim(attn.to_q(hidden_states))
            key = attn.head_to_batch_dim(attn.to_k(context))
            probs = attn.get_attention_scores(query, key, None)  # (B * heads) x Q x T
            self.store.maps.append(probs.reshape(hidden_states.shape[0], attn.heads, *probs.shape[1:]).mean(dim=1))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


@contextlib.contextmanager
def recording_attention(unet: torch.nn.Module) -> Iterator[AttentionStore]:
    """Install ``AttentionRecorder``s on every attention layer; restore the previous processors on exit."""
    original = dict(unet.attn_processors)
    store = AttentionStore()
    unet.set_attn_processor({name: AttentionRecorder(proc, store) for name, proc in original.items()})
    try:
        yield store
    finally:
        unet.set_attn_processor(original)


def attention_loss(maps: Sequence[torch.Tensor], masks: torch.Tensor, positions: Sequence[Sequence[int]],
                   latent_size: tuple[int, int]) -> torch.Tensor:
    """Sum over regions of 1 - (attention mass inside the mask / the region tokens' total mass), mean over layers.

    ``maps``: 1 x Q x T per layer; ``masks``: K x H x W float (any resolution; area-downsampled per layer).
    """
    if not maps:
        raise ValueError("ntlb: no cross-attention was recorded (does the UNet have cross-attention layers?)")
    losses = []
    for probs in maps:
        factor = math.sqrt(latent_size[0] * latent_size[1] / probs.shape[1])
        size = (round(latent_size[0] / factor), round(latent_size[1] / factor))
        small = F.interpolate(masks[None].to(probs.dtype), size=size, mode="area")[0].flatten(1)  # K x Q
        loss = probs.new_zeros(())
        for r, tokens in enumerate(positions):
            mass = probs[0, :, tokens].sum(dim=-1)  # Q
            loss = loss + 1.0 - (mass * small[r]).sum() / mass.sum().clamp_min(1e-12)
        losses.append(loss)
    return torch.stack(losses).mean()


def optimise_latents(pipe: StableDiffusionPipeline, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                     masks: torch.Tensor, positions: Sequence[Sequence[int]], step_size: float,
                     iterations: int = 1) -> tuple[torch.Tensor, list[float]]:
    """``iterations`` gradient steps on the latents against ``attention_loss``; return them and the losses seen.

    The returned list holds the loss before each step and after the last one (``iterations + 1`` values).
    """
    history = []
    latent_size = tuple(latents.shape[-2:])
    with recording_attention(pipe.unet) as store:
        for iteration in range(iterations + 1):
            store.maps.clear()
            with torch.enable_grad():
                x = latents.detach().requires_grad_(True)
                store.active = True
                pipe.unet(pipe.scheduler.scale_model_input(x, t), t, encoder_hidden_states=cond)
                store.active = False
                loss = attention_loss(store.maps, masks, positions, latent_size)
                history.append(float(loss.detach()))
                if iteration == iterations:
                    break
                (grad,) = torch.autograd.grad(loss, x)
            latents = (x - step_size * grad).detach()
    return latents, history


@dataclass(frozen=True)
class SampleSettings:
    """Sampling settings shared by the baselines."""

    steps: int = 50
    guidance: float = 7.5
    height: int | None = None  # None = the model's size
    width: int | None = None
    ntlb_steps: int | None = None  # denoising steps (from the first) optimised; None: the first half of `steps`
    ntlb_iterations: int = 1  # gradient steps per such denoising step
    ntlb_step_size: float = 20.0

    @property
    def optimised_steps(self) -> int:
        """The denoising steps (from the first) that get ntlb's latent optimisation."""
        return self.steps // 2 if self.ntlb_steps is None else min(self.ntlb_steps, self.steps)


def sample_text(pipe: StableDiffusionPipeline, prompt: str, settings: SampleSettings,
                generator: torch.Generator) -> np.ndarray:
    """One image (H x W x 3 uint8) from the plain pipeline (``global-only`` and ``concat``)."""
    height, width = _size(pipe, settings)
    out = pipe(prompt, height=height, width=width, num_inference_steps=settings.steps,
               guidance_scale=settings.guidance, generator=generator, output_type="np")
    return to_uint8(out.images[0])


def _size(pipe: StableDiffusionPipeline, settings: SampleSettings) -> tuple[int, int]:
    """The generation size: the settings' or the model's."""
    default = model_size(pipe)
    return settings.height or default[0], settings.width or default[1]


@torch.no_grad()
def sample_ntlb(pipe: StableDiffusionPipeline, prompt: str, masks: np.ndarray, local_prompts: Sequence[str],
                settings: SampleSettings, generator: torch.Generator) -> tuple[np.ndarray, list[float]]:
    """One ``ntlb`` image (H x W x 3 uint8) for index map ``masks`` (regions 1..K); also the losses seen."""
    # 1. Prompt, token positions and masks (one float mask per region, at the index map's resolution)
    prompt = fit_prompt(pipe.tokenizer, prompt, local_prompts)
    full = concat_prompt(prompt, local_prompts)
    positions = token_positions(pipe.tokenizer, prompt, local_prompts)
    region_masks = torch.from_numpy(np.stack([masks == i for i in range(1, len(local_prompts) + 1)])).float()
    device = pipe._execution_device
    cond, uncond = pipe.encode_prompt(full, device, 1, True, negative_prompt="")
    # 2. Timesteps and initial noise
    height, width = _size(pipe, settings)
    pipe.scheduler.set_timesteps(settings.steps, device=device)
    latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, height, width, cond.dtype, device, generator)
    step_kwargs = pipe.prepare_extra_step_kwargs(generator, 0.0)
    history: list[float] = []
    # 3. Denoising loop: latent optimisation on the first ntlb_steps steps, then a guided scheduler step
    for i, t in enumerate(pipe.scheduler.timesteps):
        if i < settings.optimised_steps:
            latents, losses = optimise_latents(pipe, latents, t, cond, region_masks.to(device), positions,
                                               settings.ntlb_step_size, settings.ntlb_iterations)
            history += losses
        x = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_uncond, noise_cond = pipe.unet(x, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        noise = joint_cfg(noise_uncond, noise_cond, settings.guidance)  # the global prompt is the one condition
        latents = pipe.scheduler.step(noise, t, latents, **step_kwargs).prev_sample
    # 4. Decode
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    array = pipe.image_processor.postprocess(image, output_type="np")[0]
    return to_uint8(array), history
