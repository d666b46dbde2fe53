"""Multi-conditional and joint classifier-free guidance, the batched pass helper, and training-time dropout."""

from __future__ import annotations

import pytest
import torch

from spatext.model.config import get_config
from spatext.model.denoiser import build_latent_denoiser, build_pixel_denoiser, cached_st, predict
from spatext.model.guidance import (
    Conditions,
    GuidancePlan,
    batch_passes,
    combine_passes,
    drop_conditions,
    guidance_plan,
    guided_prediction,
    guided_prediction_from_batch,
    joint_cfg,
    multi_conditional_cfg,
    null_conditions,
)


def _noise(seed: int, shape=(2, 4, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_zero_scales_give_the_unconditional_prediction():
    uncond, text, st = _noise(0), _noise(1), _noise(2)
    assert torch.equal(multi_conditional_cfg(uncond, [text, st], [0.0, 0.0]), uncond)
    assert torch.equal(joint_cfg(uncond, text, 0.0), uncond)


def test_one_condition_at_scale_one_gives_the_conditional_prediction():
    uncond, text, st = _noise(0), _noise(1), _noise(2)
    torch.testing.assert_close(multi_conditional_cfg(uncond, [text], [1.0]), text)
    torch.testing.assert_close(multi_conditional_cfg(uncond, [text, st], [1.0, 0.0]), text)
    torch.testing.assert_close(multi_conditional_cfg(uncond, [text, st], [0.0, 1.0]), st)
    torch.testing.assert_close(joint_cfg(uncond, st, 1.0), st)


def test_formulas_match_their_definitions():
    uncond, text, st = _noise(0), _noise(1), _noise(2)
    expected = uncond + 3.0 * (text - uncond) + 1.5 * (st - uncond)
    torch.testing.assert_close(multi_conditional_cfg(uncond, [text, st], [3.0, 1.5]), expected)
    torch.testing.assert_close(joint_cfg(uncond, text, 7.5), uncond + 7.5 * (text - uncond))
    with pytest.raises(ValueError, match="scales"):
        multi_conditional_cfg(uncond, [text, st], [1.0])


def test_guidance_plan_picks_the_form_and_names_bad_arguments():
    assert guidance_plan(7.5) == GuidancePlan(("uncond", "joint"), (7.5,))
    assert guidance_plan(7.5, 3.0, 2.0) == GuidancePlan(("uncond", "text", "st"), (3.0, 2.0))
    with pytest.raises(ValueError, match="text_guidance_scale and st_guidance_scale"):
        guidance_plan(7.5, text_scale=3.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        guidance_plan(None)


def _conditions(batch: int, text_dim: int, embed_dim: int, size: int, image: bool, seed: int = 0) -> Conditions:
    g = torch.Generator().manual_seed(seed)
    return Conditions(
        text=torch.randn(batch, 5, text_dim, generator=g),
        st=torch.randn(batch, embed_dim, size, size, generator=g),
        image=torch.randn(batch, embed_dim, generator=g) if image else None,
    )


def test_batch_passes_orders_real_and_null_conditions_per_pass():
    cond = _conditions(2, 32, 64, 8, image=True)
    null = null_conditions(cond, torch.full((1, 5, 32), 0.5))
    batched = batch_passes(cond, null, ("uncond", "text", "st", "joint"))
    texts, sts, images = batched.text.chunk(4), batched.st.chunk(4), batched.image.chunk(4)
    assert len(batched) == 8
    for i, (use_text, use_st) in enumerate([(False, False), (True, False), (False, True), (True, True)]):
        assert torch.equal(texts[i], cond.text if use_text else null.text)
        assert torch.equal(images[i], cond.image if use_text else torch.zeros_like(cond.image))  # image goes with text
        assert torch.equal(sts[i], cond.st if use_st else torch.zeros_like(cond.st))
    with pytest.raises(ValueError, match="passes"):
        batch_passes(cond, null, ("uncond", "sideways"))


def _sequential(unet, sample, t, cond: Conditions, null: Conditions, plan: GuidancePlan) -> torch.Tensor:
    """Reference: one forward per pass, then the formula."""
    outputs = []
    for name in plan.passes:
        one = batch_passes(cond, null, (name,))
        outputs.append(predict(unet, sample, one.st, t, one.text, one.image))
    if plan.passes[1:] == ("joint",):
        return joint_cfg(outputs[0], outputs[1], plan.scales[0])
    return multi_conditional_cfg(outputs[0], outputs[1:], plan.scales)


@pytest.mark.parametrize("variant", ["latent-tiny", "pixel-tiny"])
def test_batched_passes_equal_sequential_passes(variant):
    config = get_config(variant)
    build = build_latent_denoiser if config.variant == "latent" else build_pixel_denoiser
    unet = build(config).eval()
    with torch.no_grad():  # make ST matter (its input weights start at zero)
        unet.conv_in.weight[:, config.sample_channels :].normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    size = config.sample_size
    cond = _conditions(2, config.text_embed_dim, config.embed_dim, size, image=config.variant == "pixel")
    null = null_conditions(cond, torch.zeros(5, config.text_embed_dim))
    sample = torch.randn(2, config.sample_channels, size, size, generator=torch.Generator().manual_seed(2))
    calls = []

    def denoise(x: torch.Tensor, c: Conditions) -> torch.Tensor:
        calls.append(x.shape[0])
        return predict(unet, x, c.st, 400, c.text, c.image)

    with torch.no_grad():
        for plan in (guidance_plan(7.5), guidance_plan(None, 4.0, 2.5)):
            calls.clear()
            batched = guided_prediction(denoise, sample, cond, null, plan)
            assert calls == [2 * len(plan.passes)]  # all passes in one forward
            torch.testing.assert_close(batched, _sequential(unet, sample, 400, cond, null, plan), rtol=1e-4, atol=1e-5)
        text_only = guided_prediction(denoise, sample, cond, null, guidance_plan(None, 1.0, 0.0))
        reference = predict(unet, sample, torch.zeros_like(cond.st), 400, cond.text, cond.image)
    torch.testing.assert_close(text_only, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["latent-tiny", "pixel-tiny"])
def test_cached_st_guidance_equals_sequential_concatenated_passes(variant):
    """The sampler's path (passes batched once, conv_in's ST term cached) == one concatenated forward per pass."""
    config = get_config(variant)
    build = build_latent_denoiser if config.variant == "latent" else build_pixel_denoiser
    unet = build(config).eval()
    with torch.no_grad():  # random, not zero-initialised, ST weights
        unet.conv_in.weight[:, config.sample_channels :].normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    unet = unet.double()
    size = config.sample_size
    cond = _conditions(2, config.text_embed_dim, config.embed_dim, size, image=config.variant == "pixel")
    cond = Conditions(cond.text.double(), cond.st.double(), None if cond.image is None else cond.image.double())
    null = null_conditions(cond, torch.zeros(5, config.text_embed_dim))
    sample = torch.randn(2, config.sample_channels, size, size, generator=torch.Generator().manual_seed(2)).double()
    conv = unet.conv_in
    with torch.no_grad():
        for plan in (guidance_plan(7.5), guidance_plan(None, 4.0, 2.5)):
            expected = [_sequential(unet, sample, t, cond, null, plan) for t in (700, 300)]
            batched = batch_passes(cond, null, plan.passes)
            with cached_st(unet, batched.st) as denoise:  # one cache serves every step
                got = [guided_prediction_from_batch(lambda x, c, t=t: denoise(x, t, c.text, c.image), sample, batched,
                                                    plan) for t in (700, 300)]
            assert unet.conv_in is conv
            for a, b in zip(got, expected, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        no_st = _sequential(unet, sample, 300, Conditions(cond.text, null.st, cond.image), null, plan)
    assert (expected[1] - no_st).abs().max() > 1e-2  # ST reaches the prediction: the comparison can fail


def test_guided_prediction_from_batch_checks_the_batch_and_combines_like_the_formulas():
    plan = guidance_plan(None, 3.0, 1.5)
    uncond, text, st = _noise(0), _noise(1), _noise(2)
    torch.testing.assert_close(combine_passes(torch.cat([uncond, text, st]), plan),
                               multi_conditional_cfg(uncond, [text, st], [3.0, 1.5]))
    torch.testing.assert_close(combine_passes(torch.cat([uncond, text]), guidance_plan(7.5)),
                               joint_cfg(uncond, text, 7.5))
    cond = _conditions(2, 32, 64, 8, image=False)
    batched = batch_passes(cond, null_conditions(cond, torch.zeros(5, 32)), guidance_plan(7.5).passes)
    with pytest.raises(ValueError, match="batched: expected 3 passes x 2 rows, got 4"):
        guided_prediction_from_batch(lambda x, c: x, _noise(0), batched, plan)


def test_drop_conditions_extremes_and_independence():
    batch = 4000
    text = torch.randn(batch, 3, 8)
    st = torch.randn(batch, 16, 2, 2)
    image = torch.randn(batch, 16)
    null = torch.full((3, 8), 7.0)
    kept = drop_conditions(text, st, 0.0, 0.0, null, image_emb=image)
    assert torch.equal(kept.text, text) and torch.equal(kept.st, st) and torch.equal(kept.image, image)
    gone = drop_conditions(text, st, 1.0, 1.0, null, image_emb=image)
    assert torch.equal(gone.text, null.expand_as(text)) and not gone.st.any() and not gone.image.any()

    out = drop_conditions(text, st, 0.3, 0.5, null[None], generator=torch.Generator().manual_seed(0), image_emb=image)
    text_dropped = (out.text == 7.0).all(dim=(1, 2))
    st_dropped = (out.st == 0).all(dim=(1, 2, 3))
    image_dropped = (out.image == 0).all(dim=1)
    assert torch.equal(text_dropped, image_dropped)  # the image embedding is part of the global condition
    assert abs(text_dropped.float().mean() - 0.3) < 0.03 and abs(st_dropped.float().mean() - 0.5) < 0.03
    both = (text_dropped & st_dropped).float().mean()
    assert abs(both - 0.15) < 0.03  # independent draws: P(both) = 0.3 * 0.5
    again = drop_conditions(text, st, 0.3, 0.5, null, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.text, out.text) and torch.equal(again.st, out.st) and again.image is None


def test_drop_conditions_rejects_bad_probabilities():
    with pytest.raises(ValueError, match="p_st"):
        drop_conditions(torch.zeros(2, 3, 8), torch.zeros(2, 4, 2, 2), 0.1, 1.5, torch.zeros(3, 8))
