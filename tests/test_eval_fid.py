"""FID: the Fréchet distance against an independent scipy float64 computation, state merging, both extractors."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from spatext.eval import fid
from spatext.eval.fid import (
    ClipFeatureExtractor,
    feature_statistics,
    fid_summary,
    fid_update,
    frechet_distance,
    frechet_distance_from_features,
    inception_weights_description,
    make_fid,
)
from spatext.pipeline.clip import TINY_MODEL, ClipSpec, load_clip

HAS_FIDELITY = importlib.util.find_spec("torch_fidelity") is not None


def scipy_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """Reference FID in float64: np.cov statistics and scipy.linalg.sqrtm of the covariance product."""
    mu1, mu2 = x.mean(axis=0), y.mean(axis=0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def random_features(seed: int, n: int = 300, d: int = 24, shift: float = 0.0) -> np.ndarray:
    """Correlated Gaussian features (a random linear mix), float64."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


class Identity(torch.nn.Module):
    """A 'feature extractor' that returns its input: lets the FID class run on given features."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.num_features = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid_on_features(d: int):
    """torchmetrics' FID class with the identity extractor."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=Identity(d))


@pytest.fixture(scope="module")
def tiny():
    """The tiny CLIP with random weights (seeded)."""
    return load_clip(ClipSpec(model=TINY_MODEL, pretrained="none"))


def demo_images(n: int, seed: int, size: tuple[int, int] = (48, 40)) -> list[np.ndarray]:
    """Random uint8 RGB images."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("shift", [0.0, 0.5, 3.0])
def test_frechet_distance_matches_scipy(shift: float) -> None:
    x, y = random_features(0), random_features(1, shift=shift)
    expected = scipy_frechet(x, y)
    got = frechet_distance_from_features(torch.from_numpy(x), torch.from_numpy(y))
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(expected, rel=1e-6, abs=1e-8)
    mu1, s1 = feature_statistics(torch.from_numpy(x))
    np.testing.assert_allclose(s1.numpy(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    assert float(frechet_distance(mu1, s1, *feature_statistics(torch.from_numpy(y)))) == pytest.approx(expected)


def test_frechet_distance_of_a_set_with_itself_is_zero() -> None:
    x = torch.from_numpy(random_features(2))
    assert abs(float(frechet_distance_from_features(x, x))) < 1e-8


def test_fid_class_matches_scipy() -> None:
    x, y = random_features(3), random_features(4, shift=1.0)
    metric = fid_on_features(x.shape[1])
    metric.update(torch.from_numpy(x), real=True)
    metric.update(torch.from_numpy(y), real=False)
    assert float(metric.compute()) == pytest.approx(scipy_frechet(x, y), rel=1e-6)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # the summed metric itself saw no update
def test_fid_states_merge_like_distributed_reduction() -> None:
    x, y = random_features(5), random_features(6, shift=0.3)
    whole, first, second = (fid_on_features(x.shape[1]) for _ in range(3))
    whole.update(torch.from_numpy(x), real=True)
    whole.update(torch.from_numpy(y), real=False)
    for part, rows in ((first, slice(0, 170)), (second, slice(170, None))):
        part.update(torch.from_numpy(x[rows]), real=True)
        part.update(torch.from_numpy(y[rows]), real=False)
    # What a distributed "sum" reduction does: add the states of the two workers into a third metric.
    summed = fid_on_features(x.shape[1])
    for name, value in first.metric_state.items():
        setattr(summed, name, value + second.metric_state[name])
    summed.orig_dtype = torch.float64
    first.merge_state(second)
    expected = float(whole.compute())
    assert float(first.compute()) == pytest.approx(expected, rel=1e-9)
    assert float(summed.compute()) == pytest.approx(expected, rel=1e-9)


def test_clip_extractor_describes_itself_and_scores(tiny) -> None:
    metric, description = make_fid("clip", clip=tiny)
    assert description["extractor"].startswith(f"clip:{TINY_MODEL}")
    assert description["weights"] == "none (random init)"
    assert description["name"] == f"FID on CLIP {TINY_MODEL} features" and description["comparable"] is False
    assert description["feature_dim"] == tiny.embed_dim
    assert "Resize" in description["resize"] and "CenterCrop" in description["resize"]
    assert description["versions"]["torchmetrics"] and description["versions"]["torch"]
    reference = demo_images(6, 0) + demo_images(3, 1, size=(30, 70))  # two sizes: batched per size
    fid_update(metric, reference, real=True)
    fid_update(metric, reference[::-1], real=False)
    summary = fid_summary(metric, description)
    assert summary["num_real"] == summary["num_generated"] == 9
    assert 0 <= summary["fid"] < 1e-4  # the same images on both sides
    compute, metric.compute = metric.compute, lambda: torch.tensor(-2.3e-9, dtype=torch.float64)  # seen in reports
    assert fid_summary(metric, description)["fid"] == 0.0  # rounding below zero is reported as 0
    metric.compute = lambda: torch.tensor(float("nan"), dtype=torch.float64)
    assert math.isnan(fid_summary(metric, description)["fid"])  # not 0.0, the best score (max(0, nan) is 0)
    metric.compute = compute
    metric.reset()
    fid_update(metric, reference, real=True)
    fid_update(metric, [np.full_like(im, 255) for im in reference], real=False)
    assert float(metric.compute()) > 1e-3


def test_clip_extractor_matches_the_model_transform(tiny) -> None:
    """On tensors, the extractor reproduces the pipeline's PIL transform + forward (up to resampling differences)."""
    from spatext.pipeline.clip import embed_images

    images = demo_images(4, 7, size=(64, 64))  # already the model's size: the resize is the identity
    got = ClipFeatureExtractor(tiny)(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
    from PIL import Image

    want = embed_images(tiny, [Image.fromarray(im) for im in images])
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_clip_extractor_features_are_the_pipeline_embeddings_of_non_square_images(tiny) -> None:
    """Images that need resizing (97 x 131 and 131 x 97) get the pipeline's embeddings (its uint8 resize), on the
    tensor path, the numpy path of ``fid_update`` and through the metric; the description names that path."""
    from spatext.pipeline.clip import embed_images

    assert tiny.pixel_transform is not None  # the pipeline's uint8-tensor transform, not its PIL fallback
    extractor = ClipFeatureExtractor(tiny)
    for size in ((97, 131), (131, 97)):
        images = demo_images(3, sum(size), size=size)
        want = embed_images(tiny, images)  # the pipeline's embed path, computed independently of the extractor
        got = extractor(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
        assert got.dtype == torch.float64 and tuple(got.shape) == want.shape
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)
        with extractor.preprocessed_input():
            np.testing.assert_allclose(extractor(extractor.preprocess_arrays(images)).numpy(), want, rtol=0, atol=1e-6)
    mixed = demo_images(2, 1, size=(97, 131)) + demo_images(2, 2, size=(131, 97))
    metric, description = make_fid("clip", clip=tiny)
    fid_update(metric, mixed, real=True)
    want = torch.from_numpy(embed_images(tiny, mixed)).double()
    torch.testing.assert_close(metric.real_features_sum, want.sum(dim=0), rtol=0, atol=1e-5)
    assert "spatext.pipeline.resize" in description["resize"] and "Resize" in description["resize"]


def test_clip_extractor_input_types(tiny) -> None:
    extractor = ClipFeatureExtractor(tiny)
    images = torch.from_numpy(np.stack(demo_images(2, 8, size=(50, 70)))).permute(0, 3, 1, 2)
    pixels = extractor.preprocess(images)
    assert pixels.dtype == torch.float32 and tuple(pixels.shape) == (2, 3, 64, 64)
    with extractor.preprocessed_input():  # as fid_update passes images of many sizes
        torch.testing.assert_close(extractor(pixels), extractor(images))  # preprocessed floats pass straight through
    with pytest.raises(ValueError, match="uint8"):
        extractor(images.to(torch.int16))
    metric, _ = make_fid("clip", clip=tiny)  # float images in [0, 1] (torchmetrics' normalize=True) are refused,
    for floats in (images.float() / 255, pixels):  # not taken for CLIP-normalised pixels; so are preprocessed ones
        with pytest.raises(ValueError, match=r"images must be uint8 N x 3 x H x W.*float32"):
            metric.update(floats, real=True)
    metric.update(images, real=True)
    assert int(metric.real_features_num_samples) == 2


def test_make_fid_errors(tiny, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--fid-extractor.*inception, clip"):
        make_fid("dino")
    with pytest.raises(ValueError, match="CLIP model"):
        make_fid("clip")
    with pytest.raises(ValueError, match="uint8"):
        fid_update(make_fid("clip", clip=tiny)[0], [np.zeros((4, 4), dtype=np.uint8)], real=True)
    if not HAS_FIDELITY:
        with pytest.raises(ModuleNotFoundError, match="torch-fidelity.*--fid-extractor clip"):
            make_fid("inception", inception_weights=str(tmp_path / "missing.pt"))
    else:
        with pytest.raises(ValueError, match="--inception-weights.*not a file"):
            make_fid("inception", inception_weights=str(tmp_path / "missing.pt"))


# ------------------------------------------------------------------ the standard Inception path (torch-fidelity)


@pytest.fixture(scope="module")
def inception_state() -> dict[str, torch.Tensor]:
    """A random-init state dict of torch-fidelity's FID Inception (its constructor always loads weights: skip that)."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fe, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, *args, **kwargs: None)
        torch.manual_seed(0)
        module = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.skipif(not HAS_FIDELITY, reason="torch-fidelity is not installed (torchmetrics[image])")
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_inception_weights_from_a_local_file(
    inception_state, tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    path = tmp_path / f"inception{suffix}"
    if suffix == ".pt":
        torch.save(inception_state, path)
    else:
        from safetensors.torch import save_file

        save_file(inception_state, str(path))
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: pytest.fail("must not download"))
    metric, description = make_fid("inception", inception_weights=str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()  # independent of file_sha256's block reads
    assert description["weights_sha256"] == digest
    assert description["weights"].startswith(f"{path} (sha256 {digest[:16]}")
    assert description["comparable"] is False and "NOT the standard FID Inception file" in description["weights"]
    assert description["name"] == "FID" and description["feature_dim"] == 2048
    assert "299x299" in description["resize"] and description["versions"]["torch-fidelity"]
    loaded = metric.inception.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in inception_state.items())
    if suffix == ".pt":  # one forward (slow on 2 cores: Inception at 299 px); the FID math is tested above
        fid_update(metric, demo_images(2, 0, size=(40, 40)), real=True)
        assert int(metric.real_features_num_samples) == 2


@pytest.mark.skipif(not HAS_FIDELITY, reason="torch-fidelity is not installed (torchmetrics[image])")
def test_inception_fid_resizes_like_the_reference_and_names_other_resizes(
    inception_state, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default resize is the standard TF1 bilinear: features equal torch-fidelity's own extractor (which is the
    reference FID code's resize) on the same weights; the antialiased resize gives other features and is named."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    path = tmp_path / "inception.pt"
    torch.save(inception_state, path)
    monkeypatch.setattr(fid, "STANDARD_INCEPTION_SHA256_PREFIX", fid.file_sha256(str(path))[:8])  # as if standard
    image = np.indices((61, 61)).sum(axis=0) % 2 * 255  # a checkerboard: antialiasing changes it most
    batch = torch.from_numpy(np.repeat(image[None, None], 3, axis=1).astype(np.uint8))
    features = {}
    for antialias in (False, True):
        metric, description = make_fid("inception", inception_weights=str(path), antialias=antialias)
        fid_update(metric, [batch[0].permute(1, 2, 0).numpy()], real=True)
        features[antialias] = metric.real_features_sum
        assert description["comparable"] is (not antialias)
        assert ("antialiased" in description["resize"]) is antialias
    assert "antialiased resize" in description["not_comparable_because"]
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: inception_state)
    reference = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).eval()
    with torch.no_grad():
        expected = reference(batch)[0][0].double()
    relative = {a: float((features[a] - expected).norm() / expected.norm()) for a in features}  # random-init
    assert relative[False] < 1e-6 and relative[True] > 1e-3, relative  # relative: random-init features are tiny


def test_inception_weights_are_named_by_absolute_path_and_sha256(tmp_path: Path, monkeypatch) -> None:
    """Only a file whose sha256 starts like the standard file's name counts as the standard FID Inception."""
    path = tmp_path / "w.pth"
    path.write_bytes(b"not really weights")
    digest = hashlib.sha256(b"not really weights").hexdigest()
    monkeypatch.chdir(tmp_path)
    other = inception_weights_description("w.pth")
    assert other["weights"].startswith(str(path)) and other["weights_sha256"] == digest
    assert other["comparable"] is False
    monkeypatch.setattr(fid, "STANDARD_INCEPTION_SHA256_PREFIX", digest[:8])
    standard = inception_weights_description("w.pth")
    assert standard["comparable"] is True and "the standard FID Inception file" in standard["weights"]
    assert inception_weights_description(None)["comparable"] is True  # torch-fidelity's own download


@pytest.mark.skipif(not HAS_FIDELITY, reason="torch-fidelity is not installed (torchmetrics[image])")
def test_inception_weights_with_arbitrary_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"x": Identity(3)}, path)
    with pytest.raises(ValueError, match="--inception-weights.*cannot read a state dict"):
        make_fid("inception", inception_weights=str(path))


@pytest.mark.skipif(not HAS_FIDELITY, reason="torch-fidelity is not installed (torchmetrics[image])")
def test_inception_without_weights_offline_says_what_to_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(fe, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="--inception-weights PATH.*--fid-extractor clip"):
        make_fid("inception")


def test_throughput_benchmark_runs_and_agrees(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks/eval_throughput.py end to end with tiny settings (in-process): table, JSON, scipy == torch."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_throughput.py"
    monkeypatch.syspath_prepend(str(path.parent))  # its helper modules, as when run as a script
    spec = importlib.util.spec_from_file_location("eval_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--num-images", "3", "--batch", "2", "--clip-model", TINY_MODEL, "--fd-dim", "16", "--fd-samples", "60",
            "--repeats", "1", "--out", str(tmp_path)]
    assert module.main(argv) == 0
    assert "all four" in capsys.readouterr().out
    record = json.loads((tmp_path / "eval_throughput.json").read_text())
    assert set(record["scoring"]) == {"global_distance", "local_distance", "local_iou", "fid", "all four"}
    assert record["metric_values"]["local_iou"] == 1.0  # mirrored ground truth against mirrored masks
    assert record["frechet"]["rel_diff"] < 1e-9


class ChannelMeans(torch.nn.Module):
    """A feature extractor of uint8 images (per-channel means and spreads) that records each forward's batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.num_features, self.batches = 6, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(x))
        x = x.double()
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_fid_update_feeds_the_extractor_in_bounded_chunks(tiny) -> None:
    """A benchmark's images go through the extractor at most batch_size at a time (one forward of 5,000 Inception
    images would need ~67 GB), with the same statistics as whole-set features computed directly."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    images = demo_images(7, 3) + demo_images(3, 4, size=(30, 20))
    extractor = ChannelMeans()
    metric = FrechetInceptionDistance(feature=extractor)
    extractor.batches.clear()
    fid_update(metric, images, real=True, batch_size=3)
    assert extractor.batches == [3, 3, 1, 3]  # per size group, in chunks of at most 3
    want = torch.cat([extractor(torch.from_numpy(im).permute(2, 0, 1)[None]) for im in images])
    torch.testing.assert_close(metric.real_features_sum, want.sum(dim=0), rtol=1e-12, atol=1e-9)
    assert int(metric.real_features_num_samples) == 10
    clip_metric, _ = make_fid("clip", clip=tiny)
    seen = []
    forward = clip_metric.inception.forward
    clip_metric.inception.forward = lambda x: seen.append(len(x)) or forward(x)
    fid_update(clip_metric, images, real=True, batch_size=4)
    assert seen == [4, 4, 2]
    from spatext.pipeline.clip import embed_images

    torch.testing.assert_close(clip_metric.real_features_sum, torch.from_numpy(embed_images(tiny, images)).double()
                               .sum(dim=0), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        fid_update(clip_metric, images, real=True, batch_size=0)


def test_embeddings_are_computed_in_bounded_chunks(tiny, monkeypatch) -> None:
    """embed_images and embed_texts preprocess and encode at most MAX_IMAGES_PER_FORWARD inputs at a time, with the
    same embeddings as one by one."""
    from spatext.pipeline import clip

    monkeypatch.setattr(clip, "MAX_IMAGES_PER_FORWARD", 2)
    sizes = []
    preprocess = clip.preprocess_images
    monkeypatch.setattr(clip, "preprocess_images", lambda m, ims: sizes.append(len(ims)) or preprocess(m, ims))
    images = demo_images(5, 9)
    got = clip.embed_images(tiny, (image for image in images))  # any iterable: a generator too
    assert sizes == [2, 2, 1]
    np.testing.assert_allclose(got, np.concatenate([clip.embed_images(tiny, [im]) for im in images]), atol=1e-6)
    texts = [f"a photo of thing {i}" for i in range(5)]
    tokens = []
    counted = dataclasses.replace(tiny, tokenizer=lambda t: tokens.append(len(t)) or tiny.tokenizer(t))
    got = clip.embed_texts(counted, texts)
    assert tokens == [2, 2, 1] and got.shape == (5, tiny.embed_dim)
    np.testing.assert_allclose(got, np.concatenate([clip.embed_texts(tiny, t) for t in texts]), atol=1e-6)
