"""Segmenter backends (annotations, mask2former) and the Beam ModelHandler that runs them via RunInference."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub read it at import

import dataclasses
import logging
import time
from collections.abc import Sequence
from types import SimpleNamespace

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.ml.inference.base import RunInference
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to

from spatext.pipeline.records import REJECTS, Reject, Sample, Segment, Segmentation, rejects_from_failed_batch
from spatext.pipeline.segment import SegmenterModelHandler
from spatext.pipeline.segmenters import (
    RANDOM_INIT_LABEL,
    SEGMENTERS,
    Segmenter,
    SegmenterSpec,
    available_segmenters,
    check_segmenter_name,
    clean_segmentation,
    create_segmenter,
)

# A random Mask2Former's class scores are near-uniform (~1 / (num_labels + 1)) and its mask probabilities hover
# around 0.5; post-processing multiplies them by the score before binarising, so at the default thresholds
# (score 0.8, mask 0.5, overlap 0.8) it yields zero segments. Thresholds of 0 deliberately let random queries through
# so the tests can check shapes, ids, labels and scores. The tiny packaged config and a 128 px processor keep it fast.
TINY = SegmenterSpec(
    name="mask2former",
    weights="none",
    config="mask2former-tiny",
    threshold=0.0,
    mask_threshold=0.0,
    overlap_threshold=0.0,
    processor_size=128,
    batch_size=2,
)


def _sample(key: str, height: int, width: int, seed: int = 0, annotation: Segmentation | None = None) -> Sample:
    """A sample with a random RGB image."""
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Sample(key=key, source="test", caption="a test", image=image, annotation=annotation)


@pytest.fixture(scope="module")
def tiny() -> Segmenter:
    """The tiny randomly initialised Mask2Former (built once for the module)."""
    return create_segmenter(TINY)


@pytest.fixture(scope="module")
def two_samples() -> list[Sample]:
    """Two random images of different sizes and aspect ratios."""
    return [_sample("a", 100, 150, seed=1), _sample("b", 130, 90, seed=2)]


# ---------------------------------------------------------------- registry and spec


def test_registry_lists_builtin_backends() -> None:
    assert {"annotations", "mask2former"} <= set(available_segmenters())


def test_unknown_segmenter_names_the_flag_and_the_choices() -> None:
    with pytest.raises(ValueError, match="--segmenter") as info:
        create_segmenter(SegmenterSpec(name="sam"))
    for choice in available_segmenters():
        assert choice in str(info.value)


PLUGIN = "spatext.pipeline.segmenters.annotations:AnnotationSegmenter"  # a backend named by its import path


def test_a_segmenter_of_your_own_by_import_path() -> None:
    segmenter = create_segmenter(SegmenterSpec(name=PLUGIN))
    assert type(segmenter).__name__ == "AnnotationSegmenter"
    check_segmenter_name(PLUGIN)
    for name, error, message in [
        ("no_such_module_xyz:Thing", ValueError, "cannot import Thing from no_such_module_xyz"),
        ("spatext.pipeline.segmenters.annotations:Nope", ValueError, "cannot import Nope"),
        ("spatext.pipeline.segmenters.base:RANDOM_INIT_LABEL", ValueError, "is not callable"),
        ("mask2formr", ValueError, "module.path:callable"),
    ]:
        with pytest.raises(error, match=message):
            check_segmenter_name(name)
        with pytest.raises(error, match=message):
            create_segmenter(SegmenterSpec(name=name))
    with pytest.raises(TypeError, match="made a str, not a Segmenter"):
        create_segmenter(SegmenterSpec(name="builtins:repr"))


@pytest.mark.parametrize("field", ["threshold", "mask_threshold", "overlap_threshold"])
def test_spec_rejects_thresholds_outside_unit_interval(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SegmenterSpec(name="mask2former", **{field: 1.5})


# ---------------------------------------------------------------- annotations


def test_annotations_keeps_a_consistent_annotation_and_counts_its_pixels() -> None:
    id_map = np.zeros((4, 6), dtype=np.int32)
    id_map[:2, :3], id_map[2:, 3:] = 7, 3
    ann = Segmentation(id_map=id_map, segments=(Segment(7, "dog"), Segment(3, "sky")))
    segmenter = create_segmenter(SegmenterSpec(name="annotations"))
    (out,) = segmenter.segment([_sample("k", 4, 6, annotation=ann)])
    assert out.id_map is ann.id_map and out.segments == ann.segments  # nothing to clean: the map is not copied
    assert out.pixel_counts == (6, 6)
    assert segmenter.weights_label == "ground truth"


def test_annotations_cleans_inconsistent_ids() -> None:
    id_map = np.array([[1, 1, 2], [5, 5, 0]], dtype=np.int64)  # 5 has no segment info; segment 9 vanished
    ann = Segmentation(id_map=id_map, segments=(Segment(9, "cat"), Segment(2, "sky"), Segment(1, "dog")))
    (out,) = create_segmenter(SegmenterSpec(name="annotations")).segment([_sample("k", 2, 3, annotation=ann)])
    assert out.id_map.dtype == np.int32
    np.testing.assert_array_equal(out.id_map, [[1, 1, 2], [0, 0, 0]])
    assert out.segments == (Segment(2, "sky"), Segment(1, "dog"))


def test_annotations_without_annotation_is_an_error() -> None:
    with pytest.raises(ValueError, match="no annotation"):
        create_segmenter(SegmenterSpec(name="annotations")).segment([_sample("k", 4, 4)])


def test_annotations_of_wrong_size_is_an_error() -> None:
    ann = Segmentation(id_map=np.ones((3, 3), dtype=np.int32), segments=(Segment(1, "dog"),))
    with pytest.raises(ValueError, match="shape"):
        create_segmenter(SegmenterSpec(name="annotations")).segment([_sample("k", 4, 4, annotation=ann)])


# ---------------------------------------------------------------- mask2former


def _check_segmentation(seg: Segmentation, shape: tuple[int, int]) -> None:
    """The Segmentation contract: int32 map of the image's size, 0 = none, ids present == segments listed."""
    assert seg.id_map.shape == shape
    assert seg.id_map.dtype == np.int32
    assert seg.id_map.min() >= 0
    present = set(np.unique(seg.id_map).tolist()) - {0}
    assert present == {s.id for s in seg.segments}
    for s in seg.segments:
        assert isinstance(s.label, str) and s.label
        assert isinstance(s.score, float)


def test_mask2former_random_tiny_output_contract(tiny: Segmenter, two_samples: list[Sample]) -> None:
    assert tiny.weights_label == RANDOM_INIT_LABEL
    outputs = tiny.segment(two_samples)
    assert len(outputs) == 2
    for sample, seg in zip(two_samples, outputs, strict=True):
        _check_segmentation(seg, sample.image.shape[:2])
        assert len(seg.segments) >= 1  # threshold 0 (see TINY) lets random queries through
    labels = {"person", "dog", "tree", "grass", "sky", "road"}  # id2label of mask2former-tiny.json
    assert {s.label for seg in outputs for s in seg.segments} <= labels
    assert tiny.segment([]) == []


def test_mask2former_output_depends_on_the_padding_of_its_pass_only(tiny: Segmenter, monkeypatch) -> None:
    """What README says of model segmenters and batching: a batch runs as forward passes of similar shapes
    (``pass_groups``); peers of the same size leave an image's result exactly as it is alone, and so does a peer of
    the other orientation (it runs in a pass of its own); a wider peer in the same pass pads the image, which the
    model sees (the merge cuts it off, but the model's features span the padded input), and changes it (here it
    does)."""
    monkeypatch.setattr(tiny, "min_pass_pixels", 2 * 128 * 128)  # passes as a large batch on a GPU would make them
    image = _sample("a", 100, 120, seed=1)  # processed to 128 x 160 (128 px shortest edge, sides rounded up to 32)
    same, portrait, wider = _sample("c", 100, 120, seed=3), _sample("b", 150, 90, seed=2), _sample("d", 100, 150, 4)
    alone = tiny.segment([image])[0]
    for peers, position, one_pass in (([same, image], 1, True), ([image, portrait], 0, False),
                                      ([wider, image], 1, True)):
        assert (tiny.pass_groups(peers) == [[0, 1]]) is one_pass
        beside = tiny.segment(peers)[position]
        unchanged = np.array_equal(alone.id_map, beside.id_map) and alone.segments == beside.segments
        assert unchanged is (peers[0] is not wider), peers[0].key


def test_mask2former_passes_only_where_the_processor_resizes_by_a_shortest_edge(tiny, monkeypatch) -> None:
    """Passes follow the shapes the processor makes: grouped where it scales a shortest edge (its size as a SizeDict
    or a plain dict), one pass where it does not resize that way or pads to a fixed size; the default floor keeps a
    small mixed batch in one pass."""
    samples = [_sample("a", 100, 120, seed=1), _sample("b", 150, 90, seed=2), _sample("c", 100, 120, seed=3)]
    assert tiny.pass_groups(samples) == [[0, 1, 2]] and tiny.pass_groups([]) == []  # the default floor: one pass
    monkeypatch.setattr(tiny, "min_pass_pixels", 2 * 128 * 128)
    assert tiny.pass_groups(samples) == [[0, 2], [1]]
    processor = tiny.processor
    monkeypatch.setattr(processor, "size", {"shortest_edge": 128, "longest_edge": 213})
    assert tiny.pass_groups(samples) == [[0, 2], [1]]
    for name, value in (("size", {"height": 128, "width": 128}), ("size", {"max_height": 128, "max_width": 128}),
                        ("do_resize", False), ("pad_size", {"height": 256, "width": 256})):
        with monkeypatch.context() as patched:
            patched.setattr(processor, name, value)
            assert tiny.pass_groups(samples) == [[0, 1, 2]], name


def test_mask2former_pads_passes_to_the_step_grid(tiny, monkeypatch) -> None:
    """At a 256 px processor the passes are padded on from the processor's 32 px grid to 64 px (``shape_step``),
    at the bottom and right like the processor's own padding; the pass groups are cut on that grid; the results
    still equal transformers' post-processing of the padded pass."""
    from spatext.pipeline.segmenters.shape_groups import processed_shape, shape_groups

    spec = dataclasses.replace(TINY, processor_size=256)
    coarse = create_segmenter(spec)
    monkeypatch.setattr(coarse, "min_pass_pixels", 2 * 256 * 256)
    samples = [_sample("a", 100, 110, seed=1), _sample("b", 130, 100, seed=2), _sample("c", 100, 130, seed=3)]
    own = coarse.processor(images=[s.image for s in samples], return_tensors="pt",
                           input_data_format="channels_last")
    inputs, _ = coarse.preprocess(samples)
    height, width = own["pixel_values"].shape[-2:]
    assert (height, width) == (352, 352)  # the processor's own batch maximum (multiples of 32)
    assert tuple(inputs["pixel_values"].shape[-2:]) == (384, 384)  # on to multiples of 64
    torch.testing.assert_close(inputs["pixel_values"][..., :height, :width], own["pixel_values"], atol=0.05, rtol=0)
    assert not inputs["pixel_values"][..., height:, :].any() and not inputs["pixel_values"][..., width:].any()
    assert torch.equal(inputs["pixel_mask"][:, :height, :width], own["pixel_mask"])
    assert not inputs["pixel_mask"][:, height:].any() and not inputs["pixel_mask"][:, :, width:].any()
    shapes = [processed_shape(*s.image.shape[:2], 256, 427, 64) for s in samples]
    assert coarse.pass_groups(samples) == shape_groups(shapes, coarse.min_pass_pixels) == [[0, 2], [1]]
    ours = coarse.segment(samples)
    for group in coarse.pass_groups(samples):
        part = [samples[i] for i in group]
        assert all(s % 64 == 0 for s in coarse.preprocess(part)[0]["pixel_values"].shape[-2:])
        for i, ref in zip(group, _transformers_segmentations(coarse, part), strict=True):
            np.testing.assert_array_equal(ours[i].id_map, ref.id_map)
            assert ours[i].segments == ref.segments
    monkeypatch.setattr(coarse, "pass_grid", 48)  # not a multiple of the processor's 32: 64 it is, for both
    assert tuple(coarse.preprocess(samples)[0]["pixel_values"].shape[-2:]) == (384, 384)
    assert coarse.pass_groups(samples) == shape_groups(shapes, coarse.min_pass_pixels)
    at_128 = tiny.processor(images=[s.image for s in samples], return_tensors="pt", input_data_format="channels_last")
    assert tiny.preprocess(samples)[0]["pixel_values"].shape == at_128["pixel_values"].shape  # 128 px: the 32 px grid


def test_mask2former_random_init_is_logged_and_deterministic(tiny: Segmenter, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        again = create_segmenter(TINY)
    assert "pretrained: none (random init)" in caplog.text
    for (name, a), b in zip(tiny.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), name  # every worker builds the same random model


def test_mask2former_loads_saved_weights_like_in_memory(tiny: Segmenter, two_samples: list[Sample], tmp_path) -> None:
    tiny.model.save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    loaded = create_segmenter(dataclasses.replace(TINY, weights=str(tmp_path), config=None))
    assert loaded.weights_label == str(tmp_path)
    for a, b in zip(tiny.segment(two_samples), loaded.segment(two_samples), strict=True):
        np.testing.assert_array_equal(a.id_map, b.id_map)
        assert a.segments == b.segments


@pytest.mark.parametrize("weights", ["spatext-test/no-such-mask2former", "/no/such/local/dir"])
def test_mask2former_missing_weights_fail_fast(weights: str, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the library reads it once, at import
    start = time.monotonic()
    with pytest.raises(OSError, match="--segmenter-weights"):
        create_segmenter(SegmenterSpec(name="mask2former", weights=weights))
    assert time.monotonic() - start < 10


def test_mask2former_unknown_config_names_the_flag() -> None:
    with pytest.raises(ValueError, match="--segmenter-config"):
        create_segmenter(SegmenterSpec(name="mask2former", weights="none", config="no-such-config"))


def _transformers_segmentations(segmenter: Segmenter, samples: list[Sample]) -> list[Segmentation]:
    """The independent reference: transformers' own panoptic post-processing of the same forward pass, image by image
    on its own logits without the batch padding (the processor pads at the bottom right, to sizes that divide into
    whole logit cells), converted the way the segmenter converted it before its merge moved to the device (void ->
    0, ids > 0, id2label)."""
    inputs, sizes = segmenter.preprocess(samples)
    outputs = segmenter.forward(inputs)
    mask = inputs["pixel_mask"]
    results = []
    for row, size in enumerate(sizes):
        rows, cols = (mask[row].nonzero().max(0).values + 1).tolist()
        logits = outputs.masks_queries_logits[row : row + 1]
        cell = mask.shape[1] // logits.shape[2]
        assert rows % cell == 0 and cols % cell == 0  # whole cells: the reference's resize applies as it is
        own = SimpleNamespace(class_queries_logits=outputs.class_queries_logits[row : row + 1],
                              masks_queries_logits=logits[..., : rows // cell, : cols // cell])
        results += segmenter.processor.post_process_panoptic_segmentation(
            own,
            threshold=segmenter.spec.threshold,
            mask_threshold=segmenter.spec.mask_threshold,
            overlap_mask_area_threshold=segmenter.spec.overlap_threshold,
            label_ids_to_fuse=set(),
            target_sizes=[size],
        )
    return [
        clean_segmentation(
            result["segmentation"].numpy(),
            [Segment(int(i["id"]), segmenter.id2label[int(i["label_id"])], float(i["score"]))
             for i in result["segments_info"] if int(i["id"]) > 0],
            shape=size,
        )
        for result, size in zip(results, sizes, strict=True)
    ]


# Random tiny scores lie in ~0.15-0.18 and weighted mask probabilities in ~0.07-0.11: (0.16, 0.08, 0.5) keeps some
# queries and drops others; the defaults (0.8, 0.5, 0.8) keep none (-1 maps, which become all-0 maps).
@pytest.mark.parametrize("thresholds", [(0.0, 0.0, 0.0), (0.16, 0.08, 0.5), (0.8, 0.5, 0.8)])
def test_mask2former_equals_transformers_post_processing(tiny, thresholds, monkeypatch) -> None:
    threshold, mask_threshold, overlap = thresholds
    spec = dataclasses.replace(TINY, threshold=threshold, mask_threshold=mask_threshold, overlap_threshold=overlap)
    monkeypatch.setattr(tiny, "spec", spec)
    monkeypatch.setattr(tiny, "min_pass_pixels", 2 * 128 * 128)
    samples = [_sample("a", 100, 150, seed=1), _sample("b", 150, 90, seed=2), _sample("c", 100, 150, seed=3)]
    ours = tiny.segment(samples)
    groups = tiny.pass_groups(samples)
    assert groups == [[0, 2], [1]]  # two landscape images of one shape, one portrait: two forward passes
    reference = {i: ref for group in groups
                 for i, ref in zip(group, _transformers_segmentations(tiny, [samples[i] for i in group]), strict=True)}
    for seg, ref, sample in zip(ours, [reference[i] for i in range(len(samples))], samples, strict=True):
        _check_segmentation(seg, sample.image.shape[:2])
        np.testing.assert_array_equal(seg.id_map, ref.id_map)
        assert seg.segments == ref.segments
    if threshold == 0.8:
        assert not any(seg.segments for seg in ours)


def test_mask2former_preprocess_within_one_grey_level_of_a_float_resize(tiny, two_samples, monkeypatch) -> None:
    """On cuda, torchvision resizes uint8 images in float32 and rounds back (the CPU has a native uint8 kernel); the
    CPU's float path stands in for it here: pixel values within one grey level (1 / 255 / std once normalised)."""
    import torchvision.transforms.v2.functional._geometry as geometry

    images = [s.image for s in two_samples]
    plain = tiny.processor(images=images, return_tensors="pt", input_data_format="channels_last")
    native, sizes = tiny.preprocess(two_samples)
    assert sizes == [s.image.shape[:2] for s in two_samples]
    for name in ("pixel_values", "pixel_mask"):  # on the CPU: exactly the processor's own output
        assert torch.equal(native[name], plain[name])
    if not hasattr(geometry, "_do_native_uint8_resize_on_cpu"):
        pytest.skip("this torchvision has no switch for its native uint8 resize")
    monkeypatch.setattr(geometry, "_do_native_uint8_resize_on_cpu", lambda interpolation: False)
    float_path, _ = tiny.preprocess(two_samples)
    one_level = 1 / (255 * min(tiny.processor.image_std))
    difference = (float_path["pixel_values"] - native["pixel_values"]).abs().max().item()
    assert 0 < difference <= one_level * (1 + 1e-5)  # > 0: the float path did run
    assert torch.equal(float_path["pixel_mask"], native["pixel_mask"])


def test_mask2former_rejects_non_uint8_images(tiny) -> None:
    sample = _sample("f", 8, 8)
    with pytest.raises(ValueError, match="uint8"):
        tiny.segment([dataclasses.replace(sample, image=sample.image.astype(np.float32))])


# ---------------------------------------------------------------- the Beam ModelHandler


def _pipeline() -> beam.Pipeline:
    """A local pipeline on the FnApiRunner (what DirectRunner uses for batch, without first trying Prism)."""
    return beam.Pipeline(runner=FnApiRunner())


def _summary(sample: Sample) -> tuple[str, tuple[int, int], bool]:
    """What the pipeline test compares: key, id map shape, whether the segmentation holds the contract."""
    seg = sample.segmentation
    assert seg is not None
    _check_segmentation(seg, sample.image.shape[:2])
    return sample.key, seg.id_map.shape, len(seg.segments) >= 1


def test_model_handler_in_pipeline() -> None:
    samples = [_sample(f"k{i}", 64 + 8 * i, 96 - 8 * i, seed=i) for i in range(5)]
    expected = [(s.key, s.image.shape[:2], True) for s in samples]
    with _pipeline() as p:
        out = p | beam.Create(samples) | "Segment" >> RunInference(SegmenterModelHandler(TINY))
        assert_that(out | beam.Map(_summary), equal_to(expected))


def test_model_handler_settings() -> None:
    handler = SegmenterModelHandler(TINY)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 2, "max_batch_size": 2}
    assert handler.get_metrics_namespace() == "spatext_segment"
    assert handler.share_model_across_processes() is False
    assert handler.model_copies() == 1


class _FailOnBadKeys(Segmenter):
    """Test backend: ground truth, except that a batch holding a key starting with 'bad' raises."""

    name = "fail-on-bad"
    weights_label = "test"

    def __init__(self, spec: SegmenterSpec) -> None:
        self.spec = spec

    def segment(self, samples: Sequence[Sample]) -> list[Segmentation]:
        bad = [s.key for s in samples if s.key.startswith("bad")]
        if bad:
            raise RuntimeError(f"segmenter exploded on {', '.join(bad)}")
        return [Segmentation(np.zeros(s.image.shape[:2], np.int32), ()) for s in samples]


def _failure_summary(failure: tuple) -> list[tuple[str, str, str]]:
    """Check the dead-letter element's shape; one (key, exception type, reject reason) per sample of the batch."""
    batch, (exc_type, exc_repr, traceback_lines) = failure
    assert all(isinstance(s, Sample) for s in batch)
    assert "segmenter exploded" in exc_repr and isinstance(traceback_lines, list)
    rejects = rejects_from_failed_batch(failure, "segment", "segmenter_error")
    assert all(isinstance(r, Reject) and r.stage == "segment" for r in rejects)
    return [(r.key, exc_type.__name__, r.reason.split(":")[0]) for r in rejects]


def test_failing_segmenter_goes_to_failed_inferences(monkeypatch) -> None:
    monkeypatch.setitem(SEGMENTERS, "fail-on-bad", _FailOnBadKeys)
    spec = SegmenterSpec(name="fail-on-bad", batch_size=1)  # batch of 1: only the bad samples fail
    samples = [_sample(key, 8, 8) for key in ("good1", "bad1", "good2", "bad2")]
    with _pipeline() as p:
        main, dlq = p | beam.Create(samples) | RunInference(SegmenterModelHandler(spec)).with_exception_handling()
        assert_that(main | "Keys" >> beam.Map(lambda s: s.key), equal_to(["good1", "good2"]), label="main")
        failed = dlq.failed_inferences | beam.FlatMap(_failure_summary)
        expected = [(k, "RuntimeError", "segmenter_error") for k in ("bad1", "bad2")]
        assert_that(failed, equal_to(expected), label="failed")


def test_a_failed_batch_runs_again_one_sample_at_a_time() -> None:
    """One sample the model cannot take fails only itself, with its own error; its batch-mates are segmented."""
    handler = SegmenterModelHandler(SegmenterSpec(name="fail-on-bad", batch_size=4))
    batch = [_sample(key, 8, 8) for key in ("good1", "bad1", "good2")]
    out = handler.run_inference(batch, _FailOnBadKeys(SegmenterSpec(name="fail-on-bad")))
    assert [type(o).__name__ for o in out] == ["Sample", "FailedSample", "Sample"]
    assert [o.key for o in (out[0], out[1].sample, out[2])] == ["good1", "bad1", "good2"]
    assert out[0].segmentation is not None and out[2].segmentation is not None
    reject = out[1].reject("segment", "segmenter_error")
    assert reject.key == "bad1" and reject.reason == "segmenter_error: RuntimeError('segmenter exploded on bad1')"
    with pytest.raises(RuntimeError, match="on bad1"):  # a batch of one: to RunInference's dead letter as before
        handler.run_inference(batch[1:2], _FailOnBadKeys(SegmenterSpec(name="fail-on-bad")))


def test_every_bad_sample_of_mixed_batches_is_rejected_alone(monkeypatch) -> None:
    """Through Beam, whatever the batching: the good samples come out, each bad one is one reject naming itself."""
    from spatext.pipeline.batch_failures import SplitFailures

    monkeypatch.setitem(SEGMENTERS, "fail-on-bad", _FailOnBadKeys)
    spec = SegmenterSpec(name="fail-on-bad", batch_size=4)
    samples = [_sample(key, 8, 8) for key in ("good1", "bad1", "good2", "bad2", "good3", "good4")]
    with _pipeline() as p:
        out, dlq = p | beam.Create(samples) | RunInference(SegmenterModelHandler(spec)).with_exception_handling()
        split = out | beam.ParDo(SplitFailures("segment", "segmenter_error")).with_outputs(REJECTS, main="ok")
        assert_that(split.ok | "Keys" >> beam.Map(lambda s: s.key), equal_to(["good1", "good2", "good3", "good4"]),
                    label="main")
        rejects = (split[REJECTS], dlq.failed_inferences | beam.FlatMap(
            rejects_from_failed_batch, "segment", "segmenter_error")) | beam.Flatten()
        assert_that(rejects | "Reasons" >> beam.Map(lambda r: (r.key, r.reason.endswith(f"on {r.key}')"))),
                    equal_to([("bad1", True), ("bad2", True)]), label="rejects")


def test_mask2former_weights_are_checked_at_launch(tmp_path, monkeypatch) -> None:
    """What a build checks before it writes anything: a local folder needs config.json, a local-looking path must
    exist, a hub name must be cached while offline; `none` always passes."""
    import huggingface_hub.constants

    from spatext.pipeline import build
    from spatext.pipeline.demo_corpus import write_corpus
    from spatext.pipeline.segmenters.mask2former import check_weights

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    check_weights("none")
    with pytest.raises(OSError, match="directory without config.json"):
        check_weights(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    check_weights(str(tmp_path))
    with pytest.raises(OSError, match="no such directory"):
        check_weights(str(tmp_path / "missing"))
    with pytest.raises(OSError, match="not in the Hugging Face cache and the hub is offline"):
        check_weights("spatext-test/no-such-mask2former")
    write_corpus(str(tmp_path / "corpus"), 2, seed=0, fmt="webdataset")
    out = tmp_path / "build"
    with pytest.raises(OSError, match="--segmenter-weights"):  # the default weights, offline: before --output
        build.run(["--input", str(tmp_path / "corpus" / "*.tar"), "--output", str(out), "--clip-model",
                   "spatext-tiny", "--clip-pretrained", "none", "--segmenter", "mask2former"])
    assert not out.exists()


def test_a_model_that_fails_every_sample_stops_being_retried_sample_by_sample() -> None:
    """Two retried batches in a row where every sample fails alone too: the model is broken, so a failing batch is
    no longer re-run per sample (one call per batch, to the dead letter) until a batch succeeds again."""
    from spatext.pipeline.model_stage import HOPELESS_AFTER

    handler = SegmenterModelHandler(SegmenterSpec(name="fail-on-bad", batch_size=3))
    calls: list[int] = []

    class Broken:
        broken = True

        def segment(self, samples):
            calls.append(len(samples))
            if self.broken:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return [Segmentation(np.zeros(s.image.shape[:2], np.int32), ()) for s in samples]

    model = Broken()
    batch = [_sample(f"k{i}", 8, 8) for i in range(3)]
    for _ in range(HOPELESS_AFTER):  # each retried: 1 batch call + 3 single calls, every sample a FailedSample
        out = handler.run_inference(batch, model)
        assert [type(o).__name__ for o in out] == ["FailedSample"] * 3
    assert calls == [3, 1, 1, 1] * HOPELESS_AFTER
    calls.clear()
    with pytest.raises(RuntimeError, match="illegal memory access"):  # now straight to the dead letter
        handler.run_inference(batch, model)
    assert calls == [3]
    model.broken = False  # recovered: a good batch resets the streak, and a later single failure is retried again
    assert [type(o).__name__ for o in handler.run_inference(batch, model)] == ["Sample"] * 3
    bad = [_sample("good", 8, 8), _sample("bad1", 8, 8)]
    out = handler.run_inference(bad, _FailOnBadKeys(SegmenterSpec(name="fail-on-bad")))
    assert [type(o).__name__ for o in out] == ["Sample", "FailedSample"]
