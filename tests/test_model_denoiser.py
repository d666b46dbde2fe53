"""Denoiser configs, the ST-extended UNets (latent and pixel), schedulers and the tiny base model."""

from __future__ import annotations

import copy
import hashlib
import json
import os

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTokenizer

from spatext.model.config import DenoiserConfig, get_config, list_configs
from spatext.model.denoiser import (
    STConvIn,
    build_latent_denoiser,
    build_pixel_denoiser,
    build_scheduler,
    cached_st,
    extend_conv_in,
    predict,
    st_feature,
)
from spatext.model.tiny_base import tiny_vocab, write_tiny_base_model

SD15_UNET_PARAMETERS = 859_520_964  # the Stable Diffusion 1.x UNet, without the ST channels


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    """The tiny Stable-Diffusion-like base model (latent-tiny sizes), written once for this module."""
    return write_tiny_base_model(str(tmp_path_factory.mktemp("base") / "tiny-sd"), seed=0)


def _inputs(config: DenoiserConfig, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random sample, ST, text tokens and image embedding of the config's sizes."""
    g = torch.Generator().manual_seed(seed)
    size = config.sample_size
    return {
        "sample": torch.randn(batch, config.sample_channels, size, size, generator=g),
        "st": torch.randn(batch, config.embed_dim, size, size, generator=g),
        "text": torch.randn(batch, 7, config.text_embed_dim, generator=g),
        "image": torch.randn(batch, config.embed_dim, generator=g),
    }


@pytest.mark.parametrize("name", ["latent-demo", "pixel-demo"])
def test_demo_configs_fit_the_shards_make_demo_writes(name):
    """`make demo` embeds with the demo's default CLIP; the demo configs must take its embeddings (README's
    "Train and sample" trains them on demo_output/build)."""
    import open_clip

    from spatext.demo import DEMO_CLIP

    config = get_config(name)
    assert config.clip_model == DEMO_CLIP
    assert config.embed_dim == open_clip.get_model_config(DEMO_CLIP)["embed_dim"]


def test_bundled_configs_are_listed_and_returned_as_copies():
    assert {"latent-tiny", "latent-sd15", "latent-demo", "pixel-tiny", "pixel-64", "pixel-demo"} <= set(list_configs())
    config = get_config("latent-tiny")
    config.unet["block_out_channels"].append(999)
    config.embed_dim = 1
    fresh = get_config("latent-tiny")
    assert fresh.unet["block_out_channels"] == [32, 64] and fresh.embed_dim == 64


def test_unknown_config_names_the_flag_and_the_choices():
    with pytest.raises(ValueError, match=r"--config 'nope'.*latent-sd15.*latent-tiny.*pixel-64.*pixel-tiny"):
        get_config("nope")


def test_config_from_a_json_file_and_its_errors(tmp_path):
    data = get_config("pixel-tiny").to_dict()
    data.pop("name")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    config = get_config(str(path))
    assert config.name == "mine" and config.variant == "pixel" and config.in_channels == 3 + 64
    path.write_text(json.dumps({**data, "colour": "red"}))
    with pytest.raises(ValueError, match=r"--config 'mine': unknown keys \['colour'\]"):
        get_config(str(path))
    path.write_text(json.dumps({**data, "variant": "audio"}))
    with pytest.raises(ValueError, match="variant must be one of latent, pixel"):
        get_config(str(path))
    path.write_text(json.dumps({**data, "unet": {"in_channels": 5}}))
    with pytest.raises(ValueError, match="unet must not set"):
        get_config(str(path))


def test_sd15_config_is_the_stable_diffusion_unet_plus_st_channels():
    config = get_config("latent-sd15")
    assert (config.sample_size, config.sample_channels, config.embed_dim, config.in_channels) == (64, 4, 768, 772)
    with torch.device("meta"):  # shapes only: no memory, no time
        unet = UNet2DConditionModel(**config.unet_kwargs())
        assert sum(p.numel() for p in unet.parameters()) == SD15_UNET_PARAMETERS
        extend_conv_in(unet, config.embed_dim)
    assert list(unet.config.block_out_channels) == [320, 640, 1280, 1280]
    assert unet.config.cross_attention_dim == 768 and unet.conv_in.in_channels == 772


def test_pixel64_config_takes_the_clip_image_embedding():
    config = get_config("pixel-64")
    kwargs = config.unet_kwargs()
    assert config.resolution == config.sample_size == 64 and config.in_channels == 3 + 768
    assert kwargs["class_embed_type"] == "projection" and kwargs["projection_class_embeddings_input_dim"] == 768


def test_extend_conv_in_keeps_old_weights_and_zeroes_new_ones():
    unet = UNet2DConditionModel(**get_config("latent-tiny").unet_kwargs())
    old = copy.deepcopy(unet.conv_in)
    extend_conv_in(unet, 10)
    assert unet.conv_in.in_channels == 14 and unet.config.in_channels == 14
    assert torch.equal(unet.conv_in.weight[:, :4], old.weight)
    assert torch.equal(unet.conv_in.weight[:, 4:], torch.zeros_like(unet.conv_in.weight[:, 4:]))
    assert torch.equal(unet.conv_in.bias, old.bias)
    with pytest.raises(ValueError, match="extra_channels"):
        extend_conv_in(unet, 0)


def test_step_zero_equals_the_base_model_for_any_st(tiny_base):
    config = get_config("latent-tiny")
    base = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").eval()
    spatext = build_latent_denoiser(config, tiny_base).eval()
    assert spatext.config.in_channels == 4 + 64
    x = _inputs(config)
    with torch.no_grad():
        expected = base(x["sample"], 500, encoder_hidden_states=x["text"]).sample
        for seed in (1, 2):
            st = torch.randn(x["st"].shape, generator=torch.Generator().manual_seed(seed)) * 10
            got = predict(spatext, x["sample"], st, 500, x["text"])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # the check can fail: once an ST weight is non-zero, ST changes the output
        spatext.conv_in.weight[:, 4:] += 0.01
        changed = predict(spatext, x["sample"], x["st"], 500, x["text"])
    assert (changed - expected).abs().max() > 1e-3


def test_latent_denoiser_rejects_a_base_model_that_does_not_fit(tiny_base):
    config = get_config("latent-tiny")
    config.text_embed_dim = 48
    with pytest.raises(ValueError, match="--base-model.*cross_attention_dim 32"):
        build_latent_denoiser(config, tiny_base)
    with pytest.raises(ValueError, match="not a latent one"):
        build_latent_denoiser(get_config("pixel-tiny"))


def test_random_denoisers_are_seeded():
    config = get_config("latent-tiny")
    a, b = build_latent_denoiser(config, seed=3), build_latent_denoiser(config, seed=3)
    c = build_latent_denoiser(config, seed=4)
    assert torch.equal(a.conv_out.weight, b.conv_out.weight)
    assert not torch.equal(a.conv_out.weight, c.conv_out.weight)


def test_pixel_denoiser_is_conditioned_on_the_clip_image_embedding_and_st():
    config = get_config("pixel-tiny")
    unet = build_pixel_denoiser(config).eval()
    assert unet.config.in_channels == 3 + 64 and unet.config.out_channels == 3
    x = _inputs(config)
    with torch.no_grad():
        unet.conv_in.weight[:, 3:].normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
        out = predict(unet, x["sample"], x["st"], 10, x["text"], x["image"])
        other_image = predict(unet, x["sample"], x["st"], 10, x["text"], -x["image"])
        other_st = predict(unet, x["sample"], -x["st"], 10, x["text"], x["image"])
    assert out.shape == x["sample"].shape
    assert (out - other_image).abs().max() > 1e-4 and (out - other_st).abs().max() > 1e-4
    with pytest.raises(ValueError, match="image embedding required"):
        predict(unet, x["sample"], x["st"], 10, x["text"])
    with pytest.raises(ValueError, match="st must be"):
        predict(unet, x["sample"], x["st"][:, :, :4], 10, x["text"], x["image"])


def _st_unet(variant: str, dtype: torch.dtype = torch.float64) -> UNet2DConditionModel:
    """A random SpaText UNet of ``variant`` whose ST input weights are random too (not the zero init), in ``dtype``."""
    config = get_config(variant)
    build = build_latent_denoiser if config.variant == "latent" else build_pixel_denoiser
    unet = build(config).eval()
    with torch.no_grad():
        unet.conv_in.weight[:, config.sample_channels :].normal_(0, 0.2, generator=torch.Generator().manual_seed(5))
        unet.conv_in.bias.normal_(0, 0.2, generator=torch.Generator().manual_seed(6))
    return unet.to(dtype)


@pytest.mark.parametrize("variant", ["latent-tiny", "pixel-tiny"])
def test_cached_st_gives_the_prediction_of_the_concatenated_conv_in(variant):
    config = get_config(variant)
    unet = _st_unet(variant)
    x = {k: v.double() for k, v in _inputs(config, batch=3).items()}
    st = x["st"].clone()
    st[0] = 0  # a null-ST row, as in a guidance batch [uncond, cond, ...]
    conv, keys = unet.conv_in, list(unet.state_dict())
    with torch.no_grad():
        expected = [predict(unet, x["sample"], st, t, x["text"], x["image"]) for t in (900, 10)]
        with cached_st(unet, st) as predict_cached:
            assert isinstance(unet.conv_in, STConvIn) and unet.conv_in.feature is None
            got = [predict_cached(x["sample"], t, x["text"], x["image"]) for t in (900, 10)]  # two steps, one cache
            feature = unet.conv_in.feature
        without_st = predict(unet, x["sample"], torch.zeros_like(st), 900, x["text"], x["image"])
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert (expected[0] - without_st)[1:].abs().max() > 1e-2  # ST matters: the check can fail
    assert feature is not None and feature.shape == (3, conv.out_channels, config.sample_size, config.sample_size)
    assert unet.conv_in is conv and list(unet.state_dict()) == keys  # restored


def test_st_feature_is_bias_plus_the_st_convolution_and_skips_zero_rows():
    from torch.utils.flop_counter import FlopCounterMode

    conv = _st_unet("latent-tiny").conv_in
    st = torch.randn(4, 64, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    st[1] = 0
    st[3] = 0
    with torch.no_grad():
        full = conv(torch.cat([torch.zeros(4, 4, 8, 8, dtype=st.dtype), st], dim=1))  # conv over [0; ST] + bias
        with FlopCounterMode(display=False) as counter:
            feature = st_feature(conv, st)
        one_row = FlopCounterMode(display=False)
        with one_row:
            conv(torch.cat([torch.zeros(1, 4, 8, 8, dtype=st.dtype), st[:1]], dim=1))
    torch.testing.assert_close(feature, full, rtol=1e-12, atol=1e-12)
    assert torch.equal(feature[1], conv.bias.view(-1, 1, 1).expand_as(feature[1]))  # zero row: the bias, exactly
    # two non-zero rows convolved, over D of the 4 + D input channels
    assert counter.get_total_flops() == 2 * one_row.get_total_flops() * 64 // 68
    empty = st_feature(conv, torch.zeros_like(st))
    assert torch.equal(empty, conv.bias.view(1, -1, 1, 1).expand_as(empty))


def test_cached_st_restores_conv_in_on_errors_and_rejects_bad_input():
    config = get_config("latent-tiny")
    unet = _st_unet("latent-tiny", torch.float32)
    x = _inputs(config)
    conv = unet.conv_in
    with pytest.raises(RuntimeError, match="inside"), cached_st(unet, x["st"]):
        raise RuntimeError("inside the block")
    assert unet.conv_in is conv
    with torch.no_grad(), cached_st(unet, x["st"]) as predict_cached:
        with pytest.raises(ValueError, match="do not nest"), cached_st(unet, x["st"]):
            pass
        with pytest.raises(ValueError, match="4 sample channels"):
            predict_cached(torch.cat([x["sample"], x["st"]], dim=1), 10, x["text"])
        with pytest.raises(ValueError, match="does not match the sample"):
            predict_cached(x["sample"][:1], 10, x["text"][:1])
        predict_cached(x["sample"], 10, x["text"])
        with pytest.raises(ValueError, match="sample has 1 rows; the cached ST term has 2"):
            predict_cached(x["sample"][:1], 10, x["text"][:1])
    assert unet.conv_in is conv
    with pytest.raises(ValueError, match="st must be"):
        STConvIn(conv, torch.zeros(2, 68, 8, 8))


def test_schedulers_come_from_the_base_model_or_the_config(tiny_base):
    latent = build_scheduler(get_config("latent-tiny"), tiny_base)
    assert isinstance(latent, DDIMScheduler) and latent.config.beta_schedule == "scaled_linear"
    pixel = build_scheduler(get_config("pixel-tiny"), tiny_base)
    assert pixel.config.beta_schedule == "squaredcos_cap_v2" and pixel.config.prediction_type == "epsilon"


def _digests(path: str) -> dict[str, str]:
    """md5 of every file under ``path``."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), path)] = hashlib.md5(f.read()).hexdigest()
    return out


def test_tiny_base_model_is_a_loadable_seeded_stable_diffusion(tiny_base, tmp_path):
    with open(os.path.join(tiny_base, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]
    assert os.path.isfile(os.path.join(tiny_base, "tokenizer", "vocab.json"))
    assert os.path.isfile(os.path.join(tiny_base, "tokenizer", "merges.txt"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red ball", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    assert _digests(write_tiny_base_model(str(tmp_path / "again"), seed=0)) == _digests(tiny_base)
    other = _digests(write_tiny_base_model(str(tmp_path / "other"), seed=1))
    assert other["unet/diffusion_pytorch_model.safetensors"] != _digests(tiny_base)[
        "unet/diffusion_pytorch_model.safetensors"
    ]


def test_tiny_tokenizer_works_offline_from_vocab_and_merges(tiny_base):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_base, subfolder="tokenizer")
    vocab, _ = tiny_vocab()
    ids = tokenizer("a red ball").input_ids
    assert ids[0] == vocab["<|startoftext|>"] and ids[-1] == vocab["<|endoftext|>"]
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "a red ball"
    assert len(tokenizer("word " * 100, truncation=True).input_ids) == 77
