"""One training micro-step of ``spatext train``: encode a batch, build ST, drop conditions, denoise, backward.

Noise, timesteps and dropout come from generators seeded by (seed, micro-step, rank), so a resumed run draws what an
uninterrupted one would, and the ranks of a data-parallel run draw different noise for their different samples.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from spatext.model.data import to_model_input
from spatext.model.denoiser import uses_image_embedding
from spatext.model.guidance import drop_conditions
from spatext.model.pipeline import SpaTextPipeline
from spatext.model.st import build_st
from spatext.model.train_setup import Session


def step_generators(
    seed: int, micro_step: int, rank: int, device: torch.device
) -> tuple[torch.Generator, torch.Generator]:
    """(CPU generator for dropout, device generator for noise / timesteps / VAE sampling) of one micro-step."""
    state = np.random.SeedSequence([seed, micro_step, rank]).generate_state(2, dtype=np.uint64)
    cpu = torch.Generator().manual_seed(int(state[0] >> 1))
    dev = torch.Generator(device=device).manual_seed(int(state[1] >> 1))
    return cpu, dev


def denoising_loss(
    unet: torch.nn.Module, noise_scheduler: DDPMScheduler, clean: torch.Tensor, text: torch.Tensor,
    st: torch.Tensor | None, image: torch.Tensor | None = None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MSE between the UNet's output at a random timestep and the scheduler's target; ``st=None``: a plain UNet.

    Calls ``unet`` itself (not ``denoiser.predict``) with predict's input layout, so a DDP wrapper sees the forward.
    """
    noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (clean.shape[0],), generator=generator, device=clean.device)
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    kind = noise_scheduler.config.prediction_type
    target = {"epsilon": noise, "sample": clean}.get(kind)
    target = noise_scheduler.get_velocity(clean, noise, timesteps) if kind == "v_prediction" else target
    model_input = noisy if st is None else torch.cat([noisy, st.to(noisy.dtype)], dim=1)  # predict()'s layout
    image = None if image is None else image.to(noisy.dtype)
    pred = unet(model_input, timesteps, encoder_hidden_states=text, class_labels=image).sample
    return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def encode_batch(
    pipe: SpaTextPipeline, batch: dict, device: torch.device, dtype: torch.dtype, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(clean sample, text tokens, ST, image embedding or None) of a batch, on the device (frozen encoders)."""
    pixels = to_model_input(batch["pixel_values"], device, dtype)  # uint8 -> [-1, 1] on the device
    if pipe.vae is not None:
        latents = pipe.vae.encode(pixels).latent_dist.sample(generator=generator)
        clean = (latents * pipe.vae.config.scaling_factor).float()
    else:
        clean = pixels.float()
    text = pipe.encode_prompt(batch["caption"], device, warn_truncation=False)  # a warning per caption would flood
    label_map = batch["label_map"].to(device, non_blocking=True)
    st = build_st(label_map, batch["segment_embeddings"].to(device, non_blocking=True), tuple(clean.shape[-2:]))
    image = batch["image_embedding"].to(device) if uses_image_embedding(pipe.unet) else None
    return clean, text, st, image


def training_loss(
    pipe: SpaTextPipeline, unet: torch.nn.Module, noise_scheduler: DDPMScheduler, batch: dict, null_text: torch.Tensor,
    args: argparse.Namespace, generators: tuple[torch.Generator, torch.Generator], dtype: torch.dtype,
) -> torch.Tensor:
    """The loss of one micro-batch: encode, build ST, drop conditions independently, denoise."""
    device = null_text.device
    clean, text, st, image = encode_batch(pipe, batch, device, dtype, generators[1])
    cond = drop_conditions(text, st, args.p_drop_text, args.p_drop_st, null_text, generators[0], image)
    return denoising_loss(unet, noise_scheduler, clean, cond.text, cond.st, cond.image, generators[1])


def micro_step(s: Session, batch: dict, null_text: torch.Tensor, micro: int) -> torch.Tensor:
    """Forward + backward of one micro-batch (optimizer step on the last of an accumulation); the loss averaged over
    the ranks (DDP averages their gradients in ``backward`` on the micro-batch that steps)."""
    acc = s.accelerator
    with acc.accumulate(s.unet):
        generators = step_generators(s.args.seed, micro, acc.process_index, acc.device)
        loss = training_loss(s.pipe, s.unet, s.noise_scheduler, batch, null_text, s.args, generators, s.dtype)
        acc.backward(loss)
        if acc.sync_gradients and s.args.max_grad_norm > 0:
            acc.clip_grad_norm_(s.unet.parameters(), s.args.max_grad_norm)
        if acc.sync_gradients:  # the rate this optimizer step uses (the scheduler moves on right after it)
            s.stepped_lr = s.optimizer.param_groups[0]["lr"]
        s.optimizer.step()
        s.lr_scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
    return acc.gather(loss.detach()[None]).mean()
