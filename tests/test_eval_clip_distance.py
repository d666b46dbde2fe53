"""Global and Local distance against a direct open_clip computation; functional == class; state merging."""

from __future__ import annotations

import pickle

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.wrappers import BootStrapper

import spatext.eval.clip_distance as clip_distance
import spatext.pipeline.crop
from spatext.eval.benchmark_set import BenchmarkSpec, load_benchmark, make_benchmark
from spatext.eval.clip_distance import (
    GlobalDistance,
    LocalDistance,
    cosine_distances,
    global_distance,
    local_distance,
)
from spatext.pipeline.clip import TINY_MODEL, ClipSpec, embed_texts, load_clip


@pytest.fixture(scope="module")
def tiny():
    """The tiny CLIP with random weights (seeded)."""
    return load_clip(ClipSpec(model=TINY_MODEL, pretrained="none"))


@pytest.fixture(scope="module")
def bench(demo_shards, tmp_path_factory):
    """The demo shards as a benchmark set (every labelled segment)."""
    out = tmp_path_factory.mktemp("bench") / "all"
    make_benchmark(BenchmarkSpec(shards=str(demo_shards), out=str(out), protocol="all"))
    return load_benchmark(str(out))


def open_clip_distance(tiny, images: list[Image.Image], texts: list[str]) -> np.ndarray:
    """Reference: the open_clip model called directly, one pair at a time, cosine in float64."""
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    out = []
    with torch.no_grad():
        for image, text in zip(images, texts, strict=True):
            a = tiny.model.encode_image(tiny.preprocess(image).unsqueeze(0)).double()
            b = tiny.model.encode_text(tokenizer([text])).double()
            out.append(1.0 - float(F.cosine_similarity(a, b).item()))
    return np.array(out)


def test_global_distance_matches_open_clip(tiny, bench) -> None:
    images = [s.reference for s in bench]
    prompts = [s.prompt for s in bench]
    expected = open_clip_distance(tiny, [Image.fromarray(im) for im in images], prompts).mean()
    got = global_distance(images, prompts, tiny)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(expected, abs=1e-5)


def test_local_distance_matches_open_clip_on_the_pipeline_crop(tiny, bench) -> None:
    assert clip_distance.segment_crop is spatext.pipeline.crop.segment_crop  # imported, not copied
    crops, texts = [], []
    for s in bench:
        for region in s.regions:
            crops.append(spatext.pipeline.crop.segment_crop(s.reference, s.masks == region.index))
            texts.append(region.prompt)
    expected = open_clip_distance(tiny, crops, texts).mean()
    got = local_distance([s.reference for s in bench], [s.masks for s in bench], [s.local_prompts for s in bench], tiny)
    assert float(got) == pytest.approx(expected, abs=1e-5)
    assert len(crops) > len(bench)  # some samples have several regions: the mean is over (sample, region)


def test_local_pairs_embed_crops_as_they_come(tiny, bench, monkeypatch) -> None:
    """Crops are embedded in chunks while the samples are cut (a benchmark's crops never all sit in memory), with
    the per-pair values of one pass over every crop."""
    images, masks, prompts = [s.reference for s in bench], [s.masks for s in bench], [s.local_prompts for s in bench]
    whole = clip_distance.local_pairs(images, masks, prompts, tiny)
    monkeypatch.setattr(clip_distance, "MAX_IMAGES_PER_FORWARD", 3)
    sizes = []
    embed = clip_distance.embed_images
    monkeypatch.setattr(clip_distance, "embed_images", lambda clip, ims: sizes.append(len(ims)) or embed(clip, ims))
    chunked = clip_distance.local_pairs(images, masks, prompts, tiny)
    most_regions = max(len(p) for p in prompts)
    assert len(sizes) > 2 and max(sizes) < 3 + most_regions and sum(sizes) == len(whole)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_cosine_distances_range_and_normalisation() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    b = torch.tensor([[5.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    np.testing.assert_allclose(cosine_distances(a, b).numpy(), [0.0, 2.0, 1 - np.sqrt(0.5)], atol=1e-12)


def test_classes_equal_functionals_over_batches(tiny, bench) -> None:
    images, masks = [s.reference for s in bench], [s.masks for s in bench]
    prompts, local = [s.prompt for s in bench], [s.local_prompts for s in bench]
    g, lo = GlobalDistance(tiny), LocalDistance(tiny)
    for start in range(0, len(bench), 5):
        g.update(images[start : start + 5], prompts[start : start + 5])
        lo.update(images[start : start + 5], masks[start : start + 5], local[start : start + 5])
    # Equal up to float32 batching noise in the CLIP forward (batches of 5 here, one batch in the functional).
    assert float(g.compute()) == pytest.approx(float(global_distance(images, prompts, tiny)), abs=1e-6)
    assert float(lo.compute()) == pytest.approx(float(local_distance(images, masks, local, tiny)), abs=1e-6)
    assert int(lo.count) == sum(len(p) for p in local)
    assert g.higher_is_better is False and lo.higher_is_better is False


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # the summed metric itself saw no update
@pytest.mark.parametrize("cls", [GlobalDistance, LocalDistance])
def test_states_merge_like_distributed_reduction(tiny, bench, cls) -> None:
    def update(metric, samples) -> None:
        images = [s.reference for s in samples]
        if cls is GlobalDistance:
            metric.update(images, [s.prompt for s in samples])
        else:
            metric.update(images, [s.masks for s in samples], [s.local_prompts for s in samples])

    whole, first, second, summed = (cls(tiny) for _ in range(4))
    update(whole, bench)
    update(first, bench[:5])
    update(second, bench[5:])
    for name, value in first.metric_state.items():  # what a distributed "sum" reduction does
        setattr(summed, name, value + second.metric_state[name])
    first.merge_state(second)
    assert float(first.compute()) == float(summed.compute())
    assert float(first.compute()) == pytest.approx(float(whole.compute()), abs=1e-6)  # float32 batching noise
    assert float(first.count) == float(whole.count)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # compute before update is the point of one check
def test_bad_inputs_are_named(tiny, bench) -> None:
    s = bench[0]
    with pytest.raises(ValueError, match="same length"):
        global_distance([s.reference], ["a", "b"], tiny)
    with pytest.raises(ValueError, match=r"images\[0\].*uint8"):
        global_distance([s.reference.astype(np.float32)], ["a"], tiny)
    with pytest.raises(ValueError, match=r"masks\[0\].*exactly 1\.\."):
        local_distance([s.reference], [s.masks], [s.local_prompts + ["extra"]], tiny)
    with pytest.raises(ValueError, match=r"masks\[0\].*shape"):
        local_distance([s.reference], [s.masks[1:]], [s.local_prompts], tiny)
    with pytest.raises(ValueError, match="nothing to average"):
        global_distance([], [], tiny)
    with pytest.raises(ValueError, match=r"prompts\[0\] must be a string, got NoneType"):
        GlobalDistance(tiny).update([s.reference], [None])
    with pytest.warns(UserWarning, match="no pair seen yet"):
        assert torch.isnan(GlobalDistance(tiny).compute())


def test_a_lone_prompt_string_is_one_prompt(tiny, bench) -> None:
    s = bench[0]
    assert float(global_distance([s.reference], s.prompt, tiny)) == float(global_distance([s.reference], [s.prompt],
                                                                                            tiny))
    assert embed_texts(tiny, "a cat").shape == (1, tiny.embed_dim)


def test_forward_on_a_batch_without_regions_keeps_the_state(tiny, bench) -> None:
    """torchmetrics' forward computes the batch value between saving and restoring the accumulated state: a batch
    with no region must give NaN there (as MeanMetric does), not raise and lose every earlier batch."""
    s = bench[0]
    metric = LocalDistance(tiny)
    first = metric([s.reference], [s.masks], [s.local_prompts])
    with pytest.warns(UserWarning, match="no pair seen yet"):
        empty = metric([s.reference], [np.zeros_like(s.masks)], [[]])
    assert torch.isnan(empty)
    assert int(metric.count) == len(s.local_prompts)
    assert float(metric.compute()) == pytest.approx(float(first))


@pytest.mark.parametrize("cls", [GlobalDistance, LocalDistance])
def test_clones_and_pickles_share_or_carry_the_clip_model(tiny, bench, cls) -> None:
    """clone() (deepcopy, used by BootStrapper and MetricTracker) shares the loaded CLIP; pickling carries it."""
    s = bench[0]
    metric = cls(tiny)
    args = ([s.reference], [s.prompt]) if cls is GlobalDistance else ([s.reference], [s.masks], [s.local_prompts])
    metric.update(*args)
    copy = metric.clone()
    assert copy.clip is tiny and copy is not metric
    copy.update(*args)
    assert int(copy.count) == 2 * int(metric.count)
    unpickled = pickle.loads(pickle.dumps(metric))  # the test's own object: no untrusted data
    assert unpickled.clip is not tiny
    assert float(unpickled.compute()) == float(metric.compute())
    unpickled.update(*args)  # the unpickled CLIP runs (its lock and uint8 transform were rebuilt)
    assert float(unpickled.compute()) == pytest.approx(float(metric.compute()), abs=1e-6)
    wrapped = BootStrapper(cls(tiny), num_bootstraps=3)
    assert all(m.clip is tiny for m in wrapped.metrics)
