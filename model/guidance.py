"""Classifier-free guidance over two conditions, the global text and ST, and the condition dropout that trains it.

Multi-conditional (one scale per condition, N+1 passes batched into one forward):
    ε̂ = ε(x_t|∅) + Σ_i s_i·(ε(x_t|c_i) − ε(x_t|∅))
Accelerated joint form (two passes):
    ε̂ = ε(x_t|∅) + s·(ε(x_t|c_text, c_ST) − ε(x_t|∅))
"∅" is the null text (the empty-prompt embedding, with a zero CLIP image embedding for the pixel variant) and a
zero ST. A *pass* names which conditions are real in one forward: ``uncond``, ``text``, ``st`` or ``joint``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

PASSES = {"uncond": (False, False), "text": (True, False), "st": (False, True), "joint": (True, True)}


@dataclass
class Conditions:
    """The conditions of a batch: text tokens (B,L,C), ST (B,D,h,w), CLIP image embedding (B,D) or None."""

    text: torch.Tensor
    st: torch.Tensor
    image: torch.Tensor | None = None

    def __len__(self) -> int:
        """Batch size."""
        return self.text.shape[0]


@dataclass(frozen=True)
class GuidancePlan:
    """Which passes one guided step runs (first is always ``uncond``) and the scale of each later pass."""

    passes: tuple[str, ...]
    scales: tuple[float, ...]


def multi_conditional_cfg(
    noise_uncond: torch.Tensor, noise_conds: Sequence[torch.Tensor], scales: Sequence[float]
) -> torch.Tensor:
    """ε̂ = ε(∅) + Σ_i s_i·(ε(c_i) − ε(∅)), one scale per condition."""
    if len(noise_conds) != len(scales):
        raise ValueError(f"scales: expected one per condition ({len(noise_conds)}), got {len(scales)}")
    guided = noise_uncond.clone()
    for noise, scale in zip(noise_conds, scales, strict=True):
        guided = guided + scale * (noise - noise_uncond)
    return guided


def joint_cfg(noise_uncond: torch.Tensor, noise_joint: torch.Tensor, scale: float) -> torch.Tensor:
    """ε̂ = ε(∅) + s·(ε(c_text, c_ST) − ε(∅)), the two-pass form."""
    return noise_uncond + scale * (noise_joint - noise_uncond)


def guidance_plan(
    guidance_scale: float | None = None, text_scale: float | None = None, st_scale: float | None = None
) -> GuidancePlan:
    """The joint two-pass plan for ``guidance_scale`` alone; the per-condition plan when either scale is given."""
    if text_scale is None and st_scale is None:
        if guidance_scale is None:
            raise ValueError("guidance_scale: give it, or text_guidance_scale / st_guidance_scale")
        return GuidancePlan(("uncond", "joint"), (_finite("guidance_scale", guidance_scale),))
    if text_scale is None or st_scale is None:
        raise ValueError("text_guidance_scale and st_guidance_scale: give both (or neither, for the joint form)")
    return GuidancePlan(("uncond", "text", "st"), (_finite("text_guidance_scale", text_scale),
                                                   _finite("st_guidance_scale", st_scale)))


def _finite(name: str, value: float) -> float:
    """``value`` as a float; ValueError for nan or infinity (they turn every pixel into nan: a black image)."""
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def batch_passes(cond: Conditions, null: Conditions, passes: Sequence[str]) -> Conditions:
    """Concatenate, pass by pass along the batch, the real or the null version of each condition."""
    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        raise ValueError(f"passes: unknown {unknown}; choose from {', '.join(PASSES)}")
    texts, sts, images = [], [], []
    for name in passes:
        use_text, use_st = PASSES[name]
        texts.append(cond.text if use_text else null.text)
        sts.append(cond.st if use_st else null.st)
        if cond.image is not None:
            images.append(cond.image if use_text else null.image)
    image = torch.cat(images) if images else None
    return Conditions(torch.cat(texts), torch.cat(sts), image)


def null_conditions(cond: Conditions, null_text: torch.Tensor) -> Conditions:
    """The null of ``cond``: ``null_text`` (L,C), (1,L,C) or (B,L,C) broadcast to the batch, zero ST, zero image emb."""
    null = null_text.to(cond.text)
    null = null.unsqueeze(0) if null.dim() == 2 else null
    image = torch.zeros_like(cond.image) if cond.image is not None else None
    return Conditions(null.expand_as(cond.text), torch.zeros_like(cond.st), image)


def guided_prediction(
    denoise: Callable[[torch.Tensor, Conditions], torch.Tensor],
    sample: torch.Tensor,
    cond: Conditions,
    null: Conditions,
    plan: GuidancePlan,
) -> torch.Tensor:
    """Run every pass of ``plan`` in one ``denoise(samples, conditions)`` call and combine them."""
    return guided_prediction_from_batch(denoise, sample, batch_passes(cond, null, plan.passes), plan)


def guided_prediction_from_batch(
    denoise: Callable[[torch.Tensor, Conditions], torch.Tensor],
    sample: torch.Tensor,
    batched: Conditions,
    plan: GuidancePlan,
) -> torch.Tensor:
    """``guided_prediction`` with the passes' conditions already batched (``batch_passes(cond, null, plan.passes)``).

    The conditions do not change over a denoising loop: a sampler batches them once and reuses them every step.
    """
    if len(batched) != sample.shape[0] * len(plan.passes):
        raise ValueError(f"batched: expected {len(plan.passes)} passes x {sample.shape[0]} rows, got {len(batched)}")
    output = denoise(torch.cat([sample] * len(plan.passes)), batched)
    return combine_passes(output, plan)


def combine_passes(output: torch.Tensor, plan: GuidancePlan) -> torch.Tensor:
    """Split the batched forward's ``output`` (pass by pass along the batch) and apply ``plan``'s guidance formula."""
    noise_uncond, *noise_conds = output.chunk(len(plan.passes))
    if plan.passes[1:] == ("joint",):
        return joint_cfg(noise_uncond, noise_conds[0], plan.scales[0])
    return multi_conditional_cfg(noise_uncond, noise_conds, plan.scales)


def drop_conditions(
    text_emb: torch.Tensor,
    st: torch.Tensor,
    p_text: float,
    p_st: float,
    null_text_emb: torch.Tensor,
    generator: torch.Generator | None = None,
    image_emb: torch.Tensor | None = None,
) -> Conditions:
    """Training-time dropout: each sample's text (with its image emb) → null w.p. ``p_text``, ST → 0 w.p. ``p_st``.

    The two draws are independent, so the model learns ε(x|∅), ε(x|text), ε(x|ST) and ε(x|text, ST).
    ``null_text_emb`` is (L,C), (1,L,C) or (B,L,C); the random draws use ``generator`` (a CPU generator).
    """
    for name, p in (("p_text", p_text), ("p_st", p_st)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    batch = text_emb.shape[0]
    draws = torch.rand(2, batch, generator=generator)
    drop_text = (draws[0] < p_text).to(text_emb.device)
    drop_st = (draws[1] < p_st).to(st.device)
    null = null_text_emb.to(text_emb)
    null = null.unsqueeze(0) if null.dim() == 2 else null
    text = torch.where(drop_text[:, None, None], null.expand_as(text_emb), text_emb)
    st_out = torch.where(drop_st[:, None, None, None], torch.zeros_like(st), st)
    image = None
    if image_emb is not None:
        image = torch.where(drop_text.to(image_emb.device)[:, None], torch.zeros_like(image_emb), image_emb)
    return Conditions(text, st_out, image)
