"""Selection: a pure function of (seed, key); K and the segments uniform among candidates above min_area."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare

from spatext.pipeline.records import Sample, Segment, Segmentation
from spatext.pipeline.selection import SelectOptions, apply_selection, choose_segments, segment_areas


def _segmentation() -> Segmentation:
    """A 100x100 map: ids 1..4 with areas 40%, 30%, 20%, 4%, and id 9 listed but absent."""
    id_map = np.zeros((100, 100), dtype=np.int32)
    id_map[:40] = 1
    id_map[40:70] = 2
    id_map[70:90] = 3
    id_map[90:94, :] = 4
    segments = tuple(Segment(i, f"l{i}", 0.5) for i in (1, 2, 3, 4, 9))
    return Segmentation(id_map, segments)


def test_areas_are_pixel_fractions():
    areas = segment_areas(_segmentation())
    assert areas == pytest.approx({1: 0.4, 2: 0.3, 3: 0.2, 4: 0.04, 9: 0.0})


def test_areas_with_coco_panoptic_sized_ids_match_a_pixel_count():
    # COCO-panoptic ids are R + 256 G + 256**2 B of a random colour: up to 2**24 - 1
    rng = np.random.default_rng(1)
    ids = [0, 3_226_956, 16_777_215, 70_000, 5]
    id_map = rng.choice(ids, size=(60, 80)).astype(np.int32)
    segments = tuple(Segment(i, None, None) for i in (*ids[1:], 8_000_000))  # the last one is absent
    areas = segment_areas(Segmentation(id_map, segments))
    assert areas == {i: float((id_map == i).sum()) / id_map.size for i in (*ids[1:], 8_000_000)}
    assert areas[8_000_000] == 0.0
    import tracemalloc

    tracemalloc.start()
    segment_areas(Segmentation(id_map, segments))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2**20  # no counter per possible id: a bincount up to 2**24 allocated 128 MB


def test_choice_is_a_pure_function_of_seed_and_key():
    seg, opts = _segmentation(), SelectOptions(min_area=0.05, k_min=1, k_max=3, seed=7)
    keys = [f"key-{i}" for i in range(200)]
    first = {k: choose_segments(seg, k, opts) for k in keys}
    again = {k: choose_segments(seg, k, opts) for k in reversed(keys)}  # order must not matter
    assert first == again
    other_seed = {k: choose_segments(seg, k, SelectOptions(0.05, 1, 3, seed=8)) for k in keys}
    assert first != other_seed


def test_only_candidates_above_min_area_and_k_in_range():
    seg = _segmentation()
    for i in range(300):
        chosen = choose_segments(seg, f"k{i}", SelectOptions(min_area=0.05, k_min=2, k_max=5, seed=0))
        assert set(chosen) <= {1, 2, 3}  # 4 is below 5%, 9 has no pixels
        assert 2 <= len(chosen) <= 3 and len(set(chosen)) == len(chosen)  # capped by the 3 candidates


def test_no_candidate_gives_empty_choice():
    assert choose_segments(_segmentation(), "k", SelectOptions(min_area=0.5)) == []


def test_k_and_segments_are_uniform():
    seg, opts = _segmentation(), SelectOptions(min_area=0.05, k_min=1, k_max=3, seed=0)
    picks = [choose_segments(seg, f"k{i}", opts) for i in range(3000)]
    k_counts = Counter(len(p) for p in picks)
    assert chisquare([k_counts[k] for k in (1, 2, 3)]).pvalue > 1e-3
    singles = Counter(p[0] for p in picks if len(p) == 1)
    assert chisquare([singles[i] for i in (1, 2, 3)]).pvalue > 1e-3


def test_apply_selection_paints_indices_in_choice_order():
    seg = _segmentation()
    sample = Sample("k", "s", "c", np.zeros((100, 100, 3), np.uint8))
    out = apply_selection(sample, seg, [3, 1])
    expected = np.zeros((100, 100), np.uint8)
    expected[seg.id_map == 3] = 1
    expected[seg.id_map == 1] = 2
    np.testing.assert_array_equal(out.segment_map, expected)
    described = [(s.index, s.label, s.bbox) for s in out.segments]
    assert described == [(1, "l3", (0, 70, 100, 90)), (2, "l1", (0, 0, 100, 40))]
    assert out.segments[0].area == pytest.approx(0.2)


@pytest.mark.parametrize(("kwargs", "flag"), [({"min_area": 1.5}, "--min-area"), ({"k_min": 3, "k_max": 2}, "--k-min"),
                                              ({"k_max": 300}, "--k-max")])
def test_bad_options_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        SelectOptions(**kwargs)


@pytest.mark.parametrize("ids", [(0, 1, 2, 3, 7), (0, 3_226_956, 16_777_215, 70_000, 5)])
def test_areas_from_the_segmenters_counts_equal_a_pixel_count(ids):
    """A segmentation cleaned by the segmenter carries its segments' pixel counts; the areas taken from them equal
    a count of each segment's pixels, and selection picks the same segments as from the map alone."""
    from spatext.pipeline.segmenters.base import clean_segmentation

    rng = np.random.default_rng(len(ids) + ids[-1])
    id_map = rng.choice([*ids, 99], size=(70, 90), p=[0.3, 0.3, 0.2, 0.1, 0.06, 0.04]).astype(np.int32)
    listed = tuple(Segment(i, f"l{i}") for i in (*ids[1:], 1234))  # 99: no segment info (cleaned to 0); 1234: absent
    cleaned = clean_segmentation(id_map, listed)
    assert cleaned.pixel_counts is not None and len(cleaned.pixel_counts) == len(cleaned.segments)
    counted = {s.id: float((cleaned.id_map == s.id).sum()) / id_map.size for s in cleaned.segments}
    assert segment_areas(cleaned) == counted
    uncounted = Segmentation(cleaned.id_map, cleaned.segments)
    assert segment_areas(uncounted) == counted
    opts = SelectOptions(min_area=0.05, k_min=1, k_max=4, seed=3)
    assert all(choose_segments(cleaned, f"k{i}", opts) == choose_segments(uncounted, f"k{i}", opts)
               for i in range(50))


def test_pixel_counts_travel_with_the_segmentation_and_must_match_its_segments():
    import pickle

    from spatext.pipeline.segmenters.base import clean_segmentation

    seg = Segmentation(np.array([[1, 2], [2, 2]], np.int32), (Segment(1), Segment(2)), pixel_counts=(1, 3))
    back = pickle.loads(pickle.dumps(seg))
    assert back.pixel_counts == (1, 3) and back.id_map.dtype == np.int32
    with pytest.raises(ValueError, match="2 pixel counts for 1 segments"):
        Segmentation(seg.id_map, (Segment(1),), pixel_counts=(1, 3))
    # a segmenter that names the present ids itself (Mask2Former's merge) does not count: selection counts instead
    assert clean_segmentation(seg.id_map, seg.segments, present=[1, 2]).pixel_counts is None


def test_pixel_counts_follow_segment_ids_given_as_numpy_integers_or_numeric_strings():
    from spatext.pipeline.segmenters.base import clean_segmentation

    id_map = np.array([[3, 3, 5], [5, 5, 0]], np.int32)
    cleaned = clean_segmentation(id_map, (Segment(np.int64(3)), Segment("5")))  # type: ignore[arg-type]
    assert cleaned.pixel_counts == (2, 3)
