"""The CLIP wrapper and the embed stage, checked against open_clip called directly."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import apache_beam as beam
import huggingface_hub.constants
import numpy as np
import open_clip
import pytest
import torch
from apache_beam.ml.inference.base import RunInference
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image
from safetensors.torch import save_file

from spatext.pipeline.clip import (
    RANDOM_INIT_LABEL,
    TINY_MODEL,
    ClipSpec,
    check_pretrained,
    embed_images,
    embed_texts,
    load_clip,
    preprocess_images,
)
from spatext.pipeline.crop import mask_bbox, segment_crop
from spatext.pipeline.embed import ClipEmbedder
from spatext.pipeline.records import Embeddings, Sample, SelectedSegment

TINY = ClipSpec(model=TINY_MODEL, pretrained="none", batch_size=4)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network: the hub reads HF_HUB_OFFLINE at import, so patch its constant too; an empty cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def tiny():
    """The tiny architecture with random weights (seeded)."""
    torch.manual_seed(0)
    return load_clip(TINY)


def make_sample(seed: int, height: int = 40, width: int = 56) -> Sample:
    """A random image with two selected segments (a rectangle and a random blob)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    segment_map = np.zeros((height, width), dtype=np.uint8)
    segment_map[2 : height // 2, 3 : width // 3] = 1
    segment_map[(rng.random((height, width)) < 0.3) & (segment_map == 0)] = 2
    segments = tuple(
        SelectedSegment(
            index=i, area=float((segment_map == i).mean()), bbox=mask_bbox(segment_map == i), label=None, score=None
        )
        for i in (1, 2)
    )
    return Sample(
        key=f"k{seed}",
        source="test",
        caption=f"a photo number {seed}",
        image=image,
        segment_map=segment_map,
        segments=segments,
    )


def _open_clip_image(model: torch.nn.Module, pixels: torch.Tensor) -> np.ndarray:
    """open_clip's encode_image of one preprocessed image, L2-normalised."""
    with torch.no_grad():
        features = model.encode_image(pixels.unsqueeze(0))[0]
    return (features / features.norm()).numpy()


def test_embeddings_equal_open_clip(tiny) -> None:
    samples = [make_sample(1), make_sample(2, 30, 70)]
    preprocess = open_clip.image_transform(64, is_train=False)
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    results = ClipEmbedder(TINY).run_inference(samples, tiny)
    assert [sample.key for sample, _ in results] == ["k1", "k2"]
    for sample, emb in results:
        assert isinstance(emb, Embeddings) and emb.segments.shape == (2, 64)
        for row, segment in zip(emb.segments, sample.segments, strict=True):
            crop = segment_crop(sample.image, sample.segment_map == segment.index)
            # open_clip's own PIL transform as the reference; ours resizes with torch (within one grey level of
            # PIL's, tests/test_resize.py), which moves unit embeddings by ~5e-5
            np.testing.assert_allclose(row, _open_clip_image(tiny.model, preprocess(crop)), atol=5e-4)
        whole = _open_clip_image(tiny.model, preprocess(Image.fromarray(sample.image)))
        np.testing.assert_allclose(emb.image, whole, atol=5e-4)
        with torch.no_grad():
            text = tiny.model.encode_text(tokenizer([sample.caption]))[0]
        np.testing.assert_allclose(emb.caption, (text / text.norm()).numpy(), atol=1e-5)


def test_without_a_tensor_transform_the_pil_transform_runs_exactly(tiny) -> None:
    pil_only = dataclasses.replace(tiny, pixel_transform=None)
    sample = make_sample(4)
    crops = [segment_crop(sample.image, sample.segment_map == s.index) for s in sample.segments]
    want = np.stack([_open_clip_image(tiny.model, tiny.preprocess(crop)) for crop in crops])
    np.testing.assert_allclose(embed_images(pil_only, crops), want, atol=1e-6)
    assert tiny.pixel_transform is not None  # the default path is the tensor one


def test_outputs_unit_norm_finite_float32(tiny) -> None:
    ((_, emb),) = ClipEmbedder(TINY).run_inference([make_sample(3)], tiny)
    for array in (emb.segments, emb.image[None], emb.caption[None]):
        assert array.dtype == np.float32 and np.isfinite(array).all()
        np.testing.assert_allclose(np.linalg.norm(array, axis=1), 1.0, atol=1e-5)


def test_segments_in_index_order(tiny) -> None:
    sample = make_sample(4)
    shuffled = Sample(**{**sample.__dict__, "segments": sample.segments[::-1]})
    (_, a), (_, b) = ClipEmbedder(TINY).run_inference([sample, shuffled], tiny)
    np.testing.assert_allclose(a.segments, b.segments, atol=1e-5)


def test_batching_invariance(tiny) -> None:
    samples = [make_sample(5), make_sample(6, 64, 32), make_sample(7, 25, 25)]
    handler = ClipEmbedder(TINY)
    together = handler.run_inference(samples, tiny)
    for sample, (same, emb) in zip(samples, together, strict=True):
        ((_, alone),) = handler.run_inference([sample], tiny)
        assert same is sample
        for field in ("segments", "image", "caption"):
            np.testing.assert_allclose(getattr(emb, field), getattr(alone, field), atol=1e-5)


def test_random_init_is_labelled(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="spatext.pipeline.clip"):
        model = load_clip(TINY)
    assert model.pretrained_label == RANDOM_INIT_LABEL == "none (random init)"
    assert model.embed_dim == 64
    assert any("pretrained: none (random init)" in r.getMessage() for r in caplog.records)


def test_unknown_model_names_flag_and_choices() -> None:
    with pytest.raises(ValueError, match=r"--clip-model 'ViT-Q-99'.*ViT-B-32"):
        load_clip(ClipSpec(model="ViT-Q-99", pretrained="none"))


def test_missing_tag_offline_fails_fast() -> None:
    start = time.monotonic()
    # a FileNotFoundError, so that the CLI prints `error: ...` and exits 2 (test_cli), not a traceback
    with pytest.raises(FileNotFoundError, match=r"--clip-pretrained 'openai'.*local checkpoint file.*`none`"):
        load_clip(ClipSpec(model="ViT-B-32", pretrained="openai"))
    with pytest.raises(FileNotFoundError, match=r"--clip-pretrained 'openai'"):  # the launcher's check: no build
        check_pretrained(ClipSpec(model="ViT-B-32", pretrained="openai"))
    check_pretrained(ClipSpec(model=TINY_MODEL, pretrained="none"))
    with pytest.raises(ValueError, match=r"--clip-pretrained 'nope'"):
        check_pretrained(ClipSpec(model=TINY_MODEL, pretrained="nope"))
    assert time.monotonic() - start < 10


def test_unknown_tag_or_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--clip-pretrained 'no-such-tag'.*openai"):
        load_clip(ClipSpec(model="ViT-B-32", pretrained="no-such-tag"))
    with pytest.raises(ValueError, match="--clip-pretrained"):
        load_clip(ClipSpec(model=TINY_MODEL, pretrained=str(tmp_path / "missing.safetensors")))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_round_trip(tiny, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in tiny.model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    loaded = load_clip(ClipSpec(model=TINY_MODEL, pretrained=str(path)))
    assert loaded.pretrained_label == str(path)
    sample = make_sample(8)
    ((_, a),) = ClipEmbedder(TINY).run_inference([sample], tiny)
    ((_, b),) = ClipEmbedder(TINY).run_inference([sample], loaded)
    for field in ("segments", "image", "caption"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


class _NotATensor:
    """An arbitrary object: a checkpoint holding one must be refused, never unpickled."""


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": _NotATensor()}}, path)
    with pytest.raises(ValueError, match="--clip-pretrained.*cannot read a state dict"):
        load_clip(ClipSpec(model=TINY_MODEL, pretrained=str(path)))


def test_checkpoint_for_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wrong.safetensors"
    save_file({"visual.proj": torch.zeros(3, 3)}, str(path))
    with pytest.raises(ValueError, match="does not fit --clip-model"):
        load_clip(ClipSpec(model=TINY_MODEL, pretrained=str(path)))


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="--clip-batch-size"):
        ClipSpec(batch_size=0)
    with pytest.raises(ValueError, match="--precision"):
        ClipSpec(precision="fp8")


def test_handler_settings() -> None:
    handler = ClipEmbedder(ClipSpec(model=TINY_MODEL, pretrained="none", batch_size=7))
    assert handler.batch_elements_kwargs() == {"min_batch_size": 7, "max_batch_size": 7}
    assert handler.get_metrics_namespace() == "spatext_embed"
    assert handler.get_num_bytes([make_sample(0)]) > 40 * 56 * 3


def test_sample_without_segment_map_raises(tiny) -> None:
    sample = Sample(key="x", source="test", caption="c", image=np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="segment_map"):
        ClipEmbedder(TINY).run_inference([sample], tiny)


def test_a_sample_that_breaks_its_batch_is_rejected_alone(tiny) -> None:
    """The batch runs again one sample at a time: the bad sample fails with its own error, the others embed as alone."""
    broken = Sample(key="broken", source="test", caption="c", image=np.zeros((8, 8, 3), dtype=np.uint8))
    good = [make_sample(1), make_sample(2)]
    out = ClipEmbedder(TINY).run_inference([good[0], broken, good[1]], tiny)
    assert [type(o).__name__ for o in out] == ["tuple", "FailedSample", "tuple"]
    assert out[1].sample.key == "broken" and "has no segment_map" in out[1].error
    for sample, (got_sample, got) in zip(good, (out[0], out[2]), strict=True):
        ((_, alone),) = ClipEmbedder(TINY).run_inference([sample], tiny)
        assert got_sample is sample
        np.testing.assert_allclose(got.segments, alone.segments, atol=1e-5)


def test_empty_inputs(tiny) -> None:
    assert embed_texts(tiny, []).shape == (0, 64)


def test_real_architecture_random_init() -> None:
    spec = ClipSpec(model="ViT-B-32", pretrained="none")
    model = load_clip(spec)
    assert model.embed_dim == 512 and model.pretrained_label == RANDOM_INIT_LABEL
    ((_, emb),) = ClipEmbedder(spec).run_inference([make_sample(9)], model)
    assert emb.segments.shape == (2, 512) and emb.image.shape == emb.caption.shape == (512,)
    np.testing.assert_allclose(np.linalg.norm(emb.segments, axis=1), 1.0, atol=1e-5)


def test_tiny_224_has_vit_sized_input_and_the_tiny_forward() -> None:
    spec = ClipSpec(model="spatext-tiny-224", pretrained="none")
    model = load_clip(spec)
    assert model.embed_dim == 64 and model.pixel_transform is not None
    pixels = preprocess_images(model, [np.zeros((300, 500, 3), dtype=np.uint8)])
    assert pixels.shape == (1, 3, 224, 224)  # the transform ViT-L/14 and ViT-B/32 use
    ((_, emb),) = ClipEmbedder(spec).run_inference([make_sample(3)], model)
    assert emb.segments.shape == (2, 64) and emb.image.shape == (64,)


def _summary(element: tuple[Sample, Embeddings]) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    sample, emb = element
    return sample.key, emb.segments.shape, emb.caption.shape


def test_model_handler_in_beam_pipeline() -> None:
    samples = [make_sample(seed) for seed in range(5)]
    with beam.Pipeline(runner="DirectRunner") as pipeline:
        embedded = (
            pipeline
            | "Create" >> beam.Create(samples)
            | "Embed" >> RunInference(ClipEmbedder(ClipSpec(model=TINY_MODEL, pretrained="none", batch_size=2)))
            | "Summary" >> beam.Map(_summary)
        )
        assert_that(embedded, equal_to([(f"k{seed}", (2, 64), (64,)) for seed in range(5)]))


def test_random_init_is_seeded_so_every_worker_builds_the_same_model() -> None:
    spec = ClipSpec(model="spatext-tiny", pretrained="none")
    image = [Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))]
    torch.manual_seed(123)  # the global RNG state must not matter
    first = embed_images(load_clip(spec), image)
    torch.manual_seed(456)
    np.testing.assert_array_equal(first, embed_images(load_clip(spec), image))
