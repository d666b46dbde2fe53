"""SpaTextPipeline end to end with the tiny base model, a random prior and the spatext-tiny CLIP (D=64).

The denoisers are untrained; their ST input weights are set to small random values here (a fresh SpaText UNet has
them at zero, so ST would have no effect) so that the tests can see the scene reach the image.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import os

import numpy as np
import pytest
import torch

from spatext.model.denoiser import predict
from spatext.model.pipeline import LocalPromptEncoder, PriorModel, SpaTextPipeline, build_pipeline
from spatext.model.prior import save_prior
from spatext.model.scene import Scene
from spatext.model.tiny_base import write_tiny_base_model
from spatext.pipeline.clip import ClipSpec, embed_texts, load_clip

STEPS = 2


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    """The tiny base model, the spatext-tiny CLIP, its local-prompt encoder and a random prior."""
    base = write_tiny_base_model(str(tmp_path_factory.mktemp("base") / "tiny-sd"))
    clip = load_clip(ClipSpec(model="spatext-tiny", pretrained="none"))
    prior = PriorModel(prior_config={"embed_dim": 64, "hidden_dim": 32, "num_layers": 1})
    with torch.no_grad():  # random weights everywhere (an untrained prior is the identity)
        prior.prior.proj_out.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    return {"base": base, "clip": clip, "encoder": LocalPromptEncoder.from_clip(clip), "prior": prior.eval()}


def _pipeline(parts: dict, config: str) -> SpaTextPipeline:
    pipe = build_pipeline(config, parts["base"], parts["encoder"], parts["prior"])
    with torch.no_grad():
        channels = pipe.sample_channels
        pipe.unet.conv_in.weight[:, channels:].normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def latent(parts) -> SpaTextPipeline:
    return _pipeline(parts, "latent-tiny")


@pytest.fixture(scope="module")
def pixel(parts) -> SpaTextPipeline:
    return _pipeline(parts, "pixel-tiny")


def _scene(size: int, prompt: str = "a red ball on grass") -> Scene:
    ball = np.zeros((size, size), bool)
    ball[: size // 2, : size // 2] = True
    grass = np.zeros((size, size), bool)
    grass[size // 2 :] = True
    return Scene(prompt, [(ball, "a red ball"), (grass, "green grass")])


def _run(pipe: SpaTextPipeline, seed: int = 0, **kwargs) -> np.ndarray:
    kwargs.setdefault("scene", _scene(32))
    kwargs.setdefault("output_type", "np")
    return pipe(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_latent_pipeline_makes_images_of_the_model_size_deterministically(latent):
    images = latent(scene=_scene(32), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 1 and images[0].size == (32, 32) and images[0].mode == "RGB"
    first = _run(latent)
    assert first.shape == (1, 32, 32, 3) and np.array_equal(first, _run(latent))
    assert not np.array_equal(first, _run(latent, seed=1))


def test_the_scene_and_the_guidance_form_change_the_image(latent):
    joint = _run(latent)
    regions = _scene(32).regions
    swapped = Scene("a red ball on grass", [(regions[0].mask, "green grass"), (regions[1].mask, "a red ball")])
    assert not np.allclose(joint, _run(latent, scene=swapped))
    per_condition = _run(latent, text_guidance_scale=5.0, st_guidance_scale=2.0)
    assert per_condition.shape == joint.shape and not np.allclose(joint, per_condition)
    # zero scales: the unconditional prediction in both forms, whatever the scene
    unconditional = _run(latent, guidance_scale=0.0)
    np.testing.assert_allclose(_run(latent, text_guidance_scale=0.0, st_guidance_scale=0.0), unconditional, atol=1e-5)
    np.testing.assert_allclose(_run(latent, scene=swapped, guidance_scale=0.0), unconditional, atol=1e-5)


def test_eta_and_callback_on_step_end_follow_diffusers(latent):
    assert "eta" in inspect.signature(latent.scheduler.step).parameters  # DDIM: η > 0 adds fresh noise per step
    base = _run(latent)
    np.testing.assert_array_equal(_run(latent, eta=0.0), base)
    stochastic = _run(latent, eta=1.0)
    assert not np.allclose(stochastic, base) and np.array_equal(stochastic, _run(latent, eta=1.0))
    seen = []

    def callback(pipe, step, timestep, tensors):
        seen.append((pipe is latent, step, int(timestep), tuple(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])} if step == STEPS - 1 else {}

    out = _run(latent, output_type="latent", callback_on_step_end=callback)
    assert [s[1] for s in seen] == list(range(STEPS)) and all(s[0] and s[3] == ("latents",) for s in seen)
    assert [s[2] for s in seen] == latent.scheduler.timesteps.tolist()
    assert torch.count_nonzero(out) == 0  # the returned latents replaced the pipeline's
    with pytest.raises(ValueError, match="only 'latents'"):
        _run(latent, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_negative_prompt_replaces_the_empty_prompt_of_the_null_passes(latent):
    base = _run(latent)
    np.testing.assert_array_equal(_run(latent, negative_prompt=""), base)  # the default null text
    negative = _run(latent, negative_prompt="blurry, dark")
    assert not np.allclose(negative, base)
    # at scale 0 the image is the null prediction's: the negative prompt's, whatever the global prompt
    np.testing.assert_allclose(_run(latent, prompt="a cat", negative_prompt="a dog", guidance_scale=0.0),
                               _run(latent, prompt="a boat", negative_prompt="a dog", guidance_scale=0.0), atol=1e-5)
    seeds = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
    pair = latent(["a red ball on grass"] * 2, scene=_scene(32), negative_prompt=["", "blurry, dark"],
                  num_inference_steps=STEPS, generator=seeds, output_type="np").images
    np.testing.assert_allclose(pair[0], base[0], atol=1e-5)
    np.testing.assert_allclose(pair[1], negative[0], atol=1e-5)
    with pytest.raises(ValueError, match="negative_prompt: got 3 for 1 prompts"):
        _run(latent, negative_prompt=["a", "b", "c"])
    with pytest.raises(ValueError, match="give one form, not both"):
        _run(latent, guidance_scale=7.5, text_guidance_scale=3.0, st_guidance_scale=2.0)


def test_prompt_embeds_stand_for_the_prompts(latent, pixel):
    prompt = "a red ball on grass"
    embeds = latent.encode_prompt([prompt])
    negative = latent.encode_prompt(["blurry, dark"])
    np.testing.assert_allclose(_run(latent, prompt=None, prompt_embeds=embeds), _run(latent, prompt=prompt),
                               atol=1e-6)
    np.testing.assert_allclose(_run(latent, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative),
                               _run(latent, prompt=prompt, negative_prompt="blurry, dark"), atol=1e-6)
    for kwargs, message in (({"prompt": prompt, "prompt_embeds": embeds}, "prompt or prompt_embeds, not both"),
                            ({"prompt": prompt, "negative_prompt_embeds": negative}, "goes with prompt_embeds"),
                            ({"prompt": None, "prompt_embeds": embeds[0]}, r"must be N x L x \d+"),
                            ({"prompt": None, "prompt_embeds": embeds, "negative_prompt_embeds": negative[:, :5]},
                             "must have prompt_embeds' shape")):
        with pytest.raises(ValueError, match=message):
            _run(latent, **kwargs)
    with pytest.raises(ValueError, match="the pixel variant needs the prompt's text"):
        _run(pixel, prompt=None, prompt_embeds=pixel.encode_prompt([prompt]))


def test_prompts_longer_than_clip_are_cut_with_a_warning(latent, caplog):
    long = " ".join(["word"] * 100)
    with caplog.at_level(logging.WARNING, logger="spatext.model.pipeline"):
        _run(latent, prompt=long, scene=Scene(long, [(_scene(32).regions[0].mask, long)]))
    assert "The following part of your input was truncated because CLIP can only handle sequences up to 77" in \
        caplog.text
    assert "1 local prompt(s) are longer than CLIP's 77 tokens and were cut" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spatext.model.pipeline"):
        _run(latent)
    assert "truncated" not in caplog.text and "were cut" not in caplog.text


def test_training_batches_cut_long_captions_without_a_warning_each(latent, caplog):
    """encode_batch runs once per training step: a warning per long caption flooded training logs (155 of 197
    lines in a 30-step demo run). Training cuts silently, like diffusers' training scripts, to the same tokens."""
    from spatext.model.train_step import encode_batch

    long = " ".join(["word"] * 100)
    batch = {"pixel_values": torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "caption": [long, "short"],
             "label_map": torch.zeros(2, 32, 32, dtype=torch.long), "segment_embeddings": torch.zeros(2, 1, 64),
             "image_embedding": torch.zeros(2, 64)}
    with caplog.at_level(logging.WARNING, logger="spatext.model.pipeline"):
        _, text, _, _ = encode_batch(latent, batch, torch.device("cpu"), torch.float32, torch.Generator())
    assert "truncated" not in caplog.text
    torch.testing.assert_close(text, latent.encode_prompt([long, "short"]), rtol=0, atol=0)
    assert "truncated" in caplog.text  # __call__'s path still warns


def test_pixel_pipeline_is_conditioned_on_the_prompt_through_the_prior(pixel):
    assert pixel.vae is None and pixel.unet.config.class_embed_type == "projection"
    images = _run(pixel, scene=_scene(16))
    assert images.shape == (1, 16, 16, 3) and np.array_equal(images, _run(pixel, scene=_scene(16)))
    assert not np.array_equal(images, _run(pixel, scene=_scene(16), prompt="a blue cube"))


def test_batches_prompts_from_scenes_and_images_per_prompt(latent):
    with_prompt = _run(latent, prompt="a red ball on grass")
    assert np.array_equal(with_prompt, _run(latent))  # prompt=None takes the scene's prompt
    empty = Scene("a quiet sky", [])  # no regions: ST is all zero
    images = _run(latent, scene=[_scene(32), empty], num_images_per_prompt=2)
    assert images.shape == (4, 32, 32, 3) and not np.array_equal(images[0], images[1])
    pairs = [(r.mask, r.prompt) for r in _scene(32).regions]
    assert np.array_equal(_run(latent, prompt="a red ball on grass", scene=pairs), with_prompt)
    # scene=None (as a diffusers user calls a text-to-image pipeline): the global prompt alone, an empty scene
    assert np.array_equal(_run(latent, prompt="a quiet sky", scene=None), _run(latent, scene=empty))
    with pytest.raises(ValueError, match="prompt: give a prompt"):
        latent(num_inference_steps=STEPS)


class ConcatenatingPipeline(SpaTextPipeline):
    """Reference: ST concatenated to the sample and run through the full conv_in at every step (no cached term)."""

    @contextlib.contextmanager
    def prepare_denoiser(self, st):
        yield lambda sample, t, text, image: predict(self.unet, sample, st, t, text, image)


@pytest.mark.parametrize("variant", ["latent", "pixel"])
def test_the_cached_st_term_gives_the_images_of_the_concatenated_conv_in(latent, pixel, variant):
    pipe = copy.deepcopy(latent if variant == "latent" else pixel).to(torch.float64)
    reference = ConcatenatingPipeline(**pipe.components)
    size = 32 if variant == "latent" else 16
    # two prompts x two images: ST rows of a scene with regions and of one without (all zero), in every pass
    kwargs = {"scene": [_scene(size), Scene("a quiet sky", [])], "num_images_per_prompt": 2, "output_type": "latent"}
    conv = pipe.unet.conv_in
    for guidance in ({"guidance_scale": 7.5}, {"text_guidance_scale": 5.0, "st_guidance_scale": 2.0}):
        got = _run(pipe, **kwargs, **guidance)
        assert got.dtype == torch.float64 and pipe.unet.conv_in is conv  # restored after the call
        torch.testing.assert_close(got, _run(reference, **kwargs, **guidance), rtol=1e-9, atol=1e-9)
    no_st = _run(pipe, **{**kwargs, "scene": [Scene(s.prompt, []) for s in kwargs["scene"]]}, **guidance)
    assert (got[0] - no_st[0]).abs().max() > 1e-3  # the scene reaches the sample: the comparison can fail


def test_conv_in_is_restored_when_the_denoising_loop_fails(latent, monkeypatch):
    conv = latent.unet.conv_in

    def fail(*args, **kwargs):
        raise RuntimeError("scheduler failed")

    monkeypatch.setattr(latent.scheduler, "step", fail)
    with pytest.raises(RuntimeError, match="scheduler failed"):
        _run(latent)
    assert latent.unet.conv_in is conv and isinstance(conv, torch.nn.Conv2d)


def test_st_holds_the_prior_embeddings_of_the_local_prompts(latent):
    scene = _scene(32)
    embeddings = latent.segment_embeddings([scene], torch.device("cpu"))
    st = latent.prepare_st([scene], embeddings, (32, 32), torch.device("cpu"))
    assert st.shape == (1, 64, 8, 8)
    expected = latent.embed_prompts(["a red ball", "green grass"])
    torch.testing.assert_close(st[0, :, 0, 0], expected[0])
    torch.testing.assert_close(st[0, :, 7, 7], expected[1])
    assert not st[0, :, 0, 7].any()  # top right: no region


def test_local_prompt_encoder_matches_the_clip_text_embeddings(parts):
    prompts = ["a red ball", "green grass", ""]
    got = parts["encoder"].encode(prompts)
    torch.testing.assert_close(got, torch.from_numpy(embed_texts(parts["clip"], prompts)), rtol=1e-5, atol=1e-6)
    assert parts["encoder"].config.pretrained == "none (random init)"


def test_a_lone_prompt_string_is_one_prompt_not_one_per_character(latent, parts):
    """diffusers' encode_prompt takes str | list[str]: a string is one prompt."""
    torch.testing.assert_close(latent.encode_prompt("a cat"), latent.encode_prompt(["a cat"]))
    torch.testing.assert_close(parts["encoder"].encode("a dog"), parts["encoder"].encode(["a dog"]))
    assert latent.embed_prompts("a dog").shape[0] == 1
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a string, got int"):
        latent.encode_prompt(["a cat", 3])


def test_prior_component_wraps_a_saved_prior(parts, tmp_path):
    save_prior(parts["prior"].prior, str(tmp_path / "prior"))
    loaded = PriorModel.from_file(str(tmp_path / "prior"))
    assert loaded.embed_dim == 64 and loaded.config.prior_config["hidden_dim"] == 32
    text = torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(text), parts["prior"](text))
        assert torch.allclose(loaded(text).norm(dim=-1), torch.ones(3))


def test_save_pretrained_from_pretrained_round_trip(latent, pixel, tmp_path):
    for name, pipe, size in (("latent", latent, 32), ("pixel", pixel, 16)):
        directory = str(tmp_path / name)
        pipe.save_pretrained(directory)
        with open(os.path.join(directory, "model_index.json")) as f:
            index = json.load(f)
        assert index["local_encoder"] == ["spatext.model.pipeline", "LocalPromptEncoder"]
        assert index["prior"] == ["spatext.model.pipeline", "PriorModel"]
        assert (index["vae"][0] is None) == (name == "pixel")
        loaded = SpaTextPipeline.from_pretrained(directory)
        loaded.set_progress_bar_config(disable=True)
        for component in ("unet", "text_encoder", "local_encoder", "prior", "vae"):
            if getattr(pipe, component) is not None:  # every weight comes back bit for bit
                saved, back = getattr(pipe, component).state_dict(), getattr(loaded, component).state_dict()
                assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
        public = [k for k in pipe.scheduler.config if not k.startswith("_")]
        assert all(loaded.scheduler.config[k] == pipe.scheduler.config[k] for k in public)
        # same images; not bit-exact: weights read through mmap sit at other memory alignments, and BLAS kernels
        # may then sum in another order (~1e-7 per op; diffusers' own save/load tests allow 1e-4)
        np.testing.assert_allclose(_run(loaded, scene=_scene(size)), _run(pipe, scene=_scene(size)), atol=1e-4)


def test_components_of_mixed_dtypes_sample_in_the_unet_dtype(latent):
    # what a --mixed-precision bf16 training run holds: text encoder and VAE in bf16 beside an fp32 UNet
    mixed = copy.deepcopy(latent)
    mixed.text_encoder.to(torch.bfloat16)
    mixed.vae.to(torch.bfloat16)
    assert mixed.unet.dtype == torch.float32
    images = _run(mixed)
    latents = _run(mixed, output_type="latent")
    assert latents.dtype == torch.float32 and np.isfinite(images).all()
    np.testing.assert_allclose(images, _run(latent), atol=0.1)  # bf16 text features: close to the fp32 images


def test_a_region_that_vanishes_at_the_model_resolution_is_an_error(latent):
    dot = np.zeros((32, 32), bool)
    dot[5, 5] = True  # one pixel of 32 x 32; the latent is 8 x 8 (a cell is 4 x 4 pixels)
    scene = Scene("a sky", [(np.ones((32, 32), bool), "sky"), (dot, "a distant bird")])
    message = r"regions\[1\] \('a distant bird'\) has no pixel at the model's resolution 8x8"
    with pytest.raises(ValueError, match=message):
        _run(latent, scene=scene)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": 3}, "prompt must be a string"),
        ({"prompt": []}, "prompt: the list is empty"),
        ({"scene": "a cat"}, "scene must be a Scene"),
        ({"scene": [(np.ones((32, 32)), "")]}, r"scene: regions\[0\]: the local prompt"),
        ({"prompt": ["a", "b", "c"], "scene": [_scene(32), _scene(32)]}, "scene: got 2 scenes for 3 prompts"),
        ({"scene": Scene("", [])}, "prompt: give a prompt"),
        ({"height": 30}, "height must be a positive multiple of 4"),
        ({"width": 0}, "width must be a positive multiple of 4"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"output_type": "jpeg"}, "output_type must be one of"),
        ({"text_guidance_scale": 3.0}, "text_guidance_scale and st_guidance_scale"),
        ({"latents": torch.zeros(1, 4, 4, 4)}, r"latents must have shape \(1, 4, 8, 8\)"),
        ({"generator": [torch.Generator(), torch.Generator()]}, "generator: got 2 generators for 1 images"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(latent, kwargs, message):
    kwargs = {"scene": _scene(32), "num_inference_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        latent(**kwargs)


def test_components_that_do_not_fit_are_rejected(parts, latent):
    small_prior = PriorModel(prior_config={"embed_dim": 32, "hidden_dim": 16, "num_layers": 0})
    with pytest.raises(ValueError, match="prior: embed_dim 32"):
        SpaTextPipeline(latent.unet, latent.scheduler, latent.text_encoder, latent.tokenizer, latent.local_encoder,
                        small_prior, latent.vae)
    with pytest.raises(ValueError, match="vae: a latent denoiser needs a VAE"):
        SpaTextPipeline(latent.unet, latent.scheduler, latent.text_encoder, latent.tokenizer, latent.local_encoder,
                        latent.prior, None)
    with pytest.raises(ValueError, match="--clip-model 'spatext-tiny': embed_dim 64 != 768"):
        build_pipeline("latent-sd15", parts["base"], parts["encoder"], parts["prior"])
