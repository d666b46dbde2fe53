"""ShardDataset: exact split over ranks x workers, shuffling, crop alignment, segment re-sampling, fsspec paths,
the decode / resize / renumber fast path against PIL and brute-force references, uint8 output + to_model_input."""

from __future__ import annotations

import io
import os
import shutil
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from spatext.model.crops import (
    MIN_DCT_SCALE,
    crop_box,
    dct_scale,
    decode_rgb,
    jpeg_size,
    load_image_crop,
    load_label_crop,
    renumber,
    resize_crop,
    single_thread,
)
from spatext.model.data import ShardDataset, collate, threaded_map, to_model_input
from spatext.model.shard_files import WorkUnit, assign_units, read_unit, resolve_files
from spatext.model.st import downsample_label_map
from spatext.pipeline.schema import encode_image, encode_segment_map, row_to_sample, shard_schema

D = 64


def _all_rows(build) -> list[dict]:
    return [row for path in resolve_files(str(build)) for row in pq.read_table(path).to_pylist()]


@pytest.fixture(scope="module")
def resharded(demo_shards, tmp_path_factory):
    """The demo rows rewritten as 3 files with row groups of 2 rows (6 units) plus an empty file."""
    rows = _all_rows(demo_shards)
    schema = pq.read_schema(resolve_files(str(demo_shards))[0])
    out = tmp_path_factory.mktemp("resharded") / "shards"
    out.mkdir()
    for i, part in enumerate([rows[:5], rows[5:9], rows[9:], []]):
        pq.write_table(pa.Table.from_pylist(part, schema=schema), out / f"p{i}.parquet", row_group_size=2)
    return out.parent


def _keys(dataset: ShardDataset, num_workers: int) -> list[str]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=num_workers, collate_fn=collate)
    return [key for batch in loader for key in batch["key"]]


@pytest.mark.parametrize("which", ["demo", "resharded"])
def test_ranks_times_workers_see_every_row_once_per_epoch(which, demo_shards, resharded):
    build = demo_shards if which == "demo" else resharded
    all_keys = sorted(row["key"] for row in _all_rows(build))
    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            dataset = ShardDataset(str(build), 32, shuffle_buffer=4, seed=3, rank=rank, world_size=2)
            dataset.set_epoch(epoch)
            keys = _keys(dataset, num_workers=2)
            assert keys, f"rank {rank} got no rows"
            seen.extend(keys)
        assert sorted(seen) == all_keys  # same set, no duplicates, none skipped
        orders.append(seen)
    assert orders[0] != orders[1]  # a new epoch reshuffles


def test_assign_units_partitions_rows_for_any_split():
    rng = np.random.default_rng(0)
    for _ in range(40):
        units = [WorkUnit(f"f{i}", g, 0, int(rng.integers(1, 9))) for i in range(int(rng.integers(1, 4)))
                 for g in range(int(rng.integers(1, 3)))]
        world, workers = int(rng.integers(1, 5)), int(rng.integers(1, 4))
        rows = []
        for rank in range(world):
            for worker in range(workers):
                got = assign_units(units, seed=1, epoch=2, rank=rank, world_size=world, worker=worker,
                                   num_workers=workers)
                rows.extend((u.path, u.row_group, r) for u in got for r in range(u.start, u.stop))
        expected = [(u.path, u.row_group, r) for u in units for r in range(u.start, u.stop)]
        assert sorted(rows) == sorted(expected)


@pytest.mark.parametrize(("groups", "world", "workers"), [
    ([16] * 4, 3, 1), ([16] * 4, 5, 1), ([100], 3, 1), ([25] * 40, 32, 1), ([7, 1, 30, 2], 3, 2), ([5], 8, 3),
])
def test_ranks_and_workers_get_equal_rows(groups, world, workers):
    """Four 16-row shards over 3 ranks used to give 32/16/16 rows, and the loop trains every rank on the fewest."""
    units = [WorkUnit(f"f{i}", 0, 0, n) for i, n in enumerate(groups)]
    counts = [sum(u.num_rows for u in assign_units(units, seed=0, epoch=0, rank=r, world_size=world, worker=w,
                                                   num_workers=workers))
              for r in range(world) for w in range(workers)]
    assert sum(counts) == sum(groups) and max(counts) - min(counts) <= 1


def test_shuffle_is_deterministic_given_seed(resharded):
    def order(seed: int) -> list[str]:
        return [s["key"] for s in ShardDataset(str(resharded), 16, shuffle_buffer=4, seed=seed)]

    assert order(5) == order(5)
    assert order(5) != order(6)
    stored = [row["key"] for row in _all_rows(resharded)]
    assert [s["key"] for s in ShardDataset(str(resharded), 16, shuffle_buffer=0)] == stored  # 0 = no shuffling


def test_sample_format_and_collate(demo_shards):
    dataset = ShardDataset(str(demo_shards), 48, shuffle_buffer=0, max_segments=5)
    assert dataset.embed_dim == D and dataset.metadata["clip_model"] == "spatext-tiny"
    assert dataset.num_rows == 12
    samples = list(dataset)
    for s in samples:
        k = int(s["num_segments"])
        assert s["pixel_values"].shape == (3, 48, 48) and s["pixel_values"].dtype == torch.float32
        assert -1.0 <= float(s["pixel_values"].min()) and float(s["pixel_values"].max()) <= 1.0
        assert s["label_map"].shape == (48, 48) and s["label_map"].dtype == torch.int64
        assert set(s["label_map"].unique().tolist()) - {0} == set(range(1, k + 1))  # contiguous 1..k
        assert s["segment_embeddings"].shape == (5, D) and not s["segment_embeddings"][k:].any()
        torch.testing.assert_close(s["segment_embeddings"][:k].norm(dim=1), torch.ones(k), atol=2e-3, rtol=0)
        assert s["caption_embedding"].shape == (D,) and s["image_embedding"].shape == (D,)
        assert isinstance(s["caption"], str) and s["num_segments"].dtype == torch.int64
    batch = collate(samples[:4])
    assert batch["pixel_values"].shape == (4, 3, 48, 48) and batch["num_segments"].shape == (4,)
    assert batch["key"] == [s["key"] for s in samples[:4]] and isinstance(batch["caption"], list)


def test_label_map_is_cropped_exactly_like_the_image(demo_shards):
    rows = {row["key"]: row_to_sample(row) for row in _all_rows(demo_shards)}
    resolution = 96
    for s in ShardDataset(str(demo_shards), resolution, shuffle_buffer=0):
        ref = rows[s["key"]]
        height, width = ref.segment_map.shape
        assert width != height  # demo images are not square: the crop matters
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        box = (left, top, left + resolution, top + resolution)
        ref_map = np.asarray(Image.fromarray(ref.segment_map).resize(size, Image.Resampling.NEAREST).crop(box))
        ref_img = np.asarray(Image.fromarray(ref.image).resize(size, Image.Resampling.BILINEAR).crop(box))
        # map each output label back to its stored index through its embedding
        back = np.zeros_like(ref_map)
        for new in range(1, int(s["num_segments"]) + 1):
            (old,) = [seg["index"] for seg in ref.segments
                      if np.allclose(seg["embedding"], s["segment_embeddings"][new - 1].numpy())]
            back[s["label_map"].numpy() == new] = old
        assert (back == ref_map).mean() > 0.97  # the same pixels up to rounding at the segment borders
        image = ((s["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5).round()
        assert np.abs(image - ref_img).mean() < 4.0  # PNG input: only resampling differences remain


def test_jpeg_reduced_decoding_stays_aligned():
    yy, xx = np.mgrid[0:300, 0:450]
    image = np.zeros((300, 450, 3), np.uint8)
    image[(yy > 100) & (yy < 200) & (xx > 200) & (xx < 330)] = 255  # a bright block off-centre
    data = encode_image(image, "jpeg")
    box = crop_box(450, 300)
    assert dct_scale((450, 300), box, 64) == 4 >= MIN_DCT_SCALE
    fast = load_image_crop(data, box, 64, (450, 300))  # draft: decoded at 1/4 scale
    assert fast.shape == (3, 64, 64) and fast.dtype == torch.uint8
    assert fast.permute(1, 2, 0).is_contiguous()  # channels-last, like the full-decode path
    fast = fast.permute(1, 2, 0).numpy()
    with Image.open(io.BytesIO(data)) as im:
        full = np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR, box=box))
    assert np.abs(fast.astype(float) - full).mean() < 6.0
    centre = [np.argwhere(a[..., 0] > 128).mean(0) for a in (fast, full)]
    np.testing.assert_allclose(centre[0], centre[1], atol=0.5)  # the block sits at the same place


def _write_shard(path, rows: list[dict], dim: int = 8) -> None:
    schema = shard_schema({"embed_dim": dim, "k_max": 3, "clip_model": "synthetic"})
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _row(key: str, image: np.ndarray, seg_map: np.ndarray, dim: int = 8) -> dict:
    segments = [{"index": int(i), "area": 0.1, "bbox": [0, 0, 1, 1], "embedding": np.full(dim, i, np.float16),
                 "label": None, "score": None} for i in sorted(set(seg_map.ravel()) - {0})]
    return {"key": key, "caption": f"caption {key}", "image": encode_image(image, "png"), "width": image.shape[1],
            "height": image.shape[0], "segment_map": encode_segment_map(seg_map), "segments": segments,
            "image_embedding": np.ones(dim, np.float16), "caption_embedding": np.ones(dim, np.float16)}


def test_segments_cropped_away_are_dropped_and_renumbered(tmp_path):
    seg_map = np.zeros((40, 100), np.uint8)
    seg_map[:, :20] = 1  # left edge: outside the centred 40 x 40 square
    seg_map[10:30, 40:60] = 2
    seg_map[0:10, 45:55] = 3
    _write_shard(tmp_path / "a.parquet", [_row("x", np.zeros((40, 100, 3), np.uint8), seg_map)])
    (s,) = list(ShardDataset(str(tmp_path / "a.parquet"), 40, shuffle_buffer=0))
    assert int(s["num_segments"]) == 2
    assert set(s["label_map"].unique().tolist()) == {0, 1, 2}
    assert s["segment_embeddings"][0, 0] == 2 and s["segment_embeddings"][1, 0] == 3  # stored order, renumbered
    assert int((s["label_map"] == 1).sum()) == 400


def test_resample_segments_picks_seeded_subsets(tmp_path):
    rows = []
    for i in range(12):
        seg_map = np.zeros((32, 32), np.uint8)
        seg_map[:16, :16], seg_map[:16, 16:], seg_map[16:, :16] = 1, 2, 3
        rows.append(_row(f"k{i}", np.zeros((32, 32, 3), np.uint8), seg_map))
    _write_shard(tmp_path / "a.parquet", rows)

    def run(epoch: int) -> dict[str, list[float]]:
        dataset = ShardDataset(str(tmp_path), 32, shuffle_buffer=0, resample_segments=True, max_segments=2)
        dataset.set_epoch(epoch)
        out = {}
        for s in dataset:
            k = int(s["num_segments"])
            assert 1 <= k <= 2 and set(s["label_map"].unique().tolist()) == set(range(k + 1))
            firsts = [int(v) for v in s["segment_embeddings"][:k, 0]]  # the stored index (embedding = index)
            assert firsts == sorted(firsts)  # stored order kept
            for new, old in enumerate(firsts, 1):  # label `new` paints exactly the stored segment's pixels
                assert torch.equal(s["label_map"] == new, torch.from_numpy(seg_map == old))
            out[s["key"]] = firsts
        return out

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert {len(v) for v in run(0).values()} == {1, 2}


def test_too_many_segments_is_an_error(tmp_path):
    seg_map = np.arange(16, dtype=np.uint8).reshape(4, 4) % 4
    _write_shard(tmp_path / "a.parquet", [_row("x", np.zeros((4, 4, 3), np.uint8), seg_map)])
    with pytest.raises(ValueError, match="max_segments"):
        ShardDataset(str(tmp_path), 4, max_segments=2)  # below the shards' k_max
    (s,) = list(ShardDataset(str(tmp_path), 4, max_segments=2, resample_segments=True))
    assert int(s["num_segments"]) <= 2


def test_memory_url_and_bad_paths(demo_shards):
    fs = fsspec.filesystem("memory")
    for path in resolve_files(str(demo_shards)):
        with open(path, "rb") as src:
            fs.pipe(f"/spatext-test/build/shards/{path.rsplit('/', 1)[-1]}", src.read())
    local = sorted(s["key"] for s in ShardDataset(str(demo_shards), 16))
    assert sorted(s["key"] for s in ShardDataset("memory://spatext-test/build", 16)) == local
    assert sorted(s["key"] for s in ShardDataset("memory://spatext-test/build/shards/*.parquet", 16)) == local
    with pytest.raises(ValueError, match="does not exist"):
        ShardDataset("memory://spatext-test/nothing", 16)
    with pytest.raises(ValueError, match="rank"):
        ShardDataset(str(demo_shards), 16, rank=2, world_size=2)


def test_paths_name_files_not_patterns_and_each_file_is_read_once(demo_shards, tmp_path):
    build = str(demo_shards)
    files = resolve_files(build)
    assert resolve_files([build, "file://" + build, os.path.relpath(build)]) == files  # one file, three spellings
    bracketed = tmp_path / "run[1]"
    shutil.copytree(demo_shards / "shards", bracketed / "build" / "shards")
    literal = ShardDataset(str(bracketed / "build"), 16)  # 'run[1]' is a folder, not a glob
    assert literal.num_rows == ShardDataset(build, 16).num_rows
    assert ShardDataset(resolve_files(str(bracketed / "build"))[0], 16).num_rows > 0


def test_unreadable_shards_and_bad_resolutions_are_named(demo_shards, tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"x\.parquet: not a readable Parquet shard"):
        ShardDataset(str(tmp_path), 16)
    unit = WorkUnit(resolve_files(str(demo_shards))[0], 0, 0, 1)
    with pytest.raises(ValueError, match=r"\.parquet: row group 0 has no column no_such_column"):
        read_unit(unit, columns=["key", "no_such_column"])
    for resolution in (32.5, 0, True):
        with pytest.raises(ValueError, match="resolution must be an int >= 1"):
            ShardDataset(str(demo_shards), resolution)


def _smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like RGB image: smooth gradients plus mild noise (JPEG keeps it close)."""
    yy, xx = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).normal(0, 8, (height, width, 3))
    image = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) % 97 * 2.5], axis=-1) + noise
    return image.clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_decode_rgb_matches_pil(mode):
    image = Image.fromarray(_smooth_image(70, 90)).convert(mode)
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        got = decode_rgb(buf.getvalue())
        with Image.open(io.BytesIO(buf.getvalue())) as im:
            ref = np.asarray(im.convert("RGB")).astype(int)
        assert got.shape == (3, 70, 90) and got.dtype == torch.uint8
        # torchvision and PIL both wrap libjpeg-turbo: the same pixels (1 level of slack for a library update)
        assert np.abs(got.permute(1, 2, 0).numpy().astype(int) - ref).max() <= (1 if fmt == "JPEG" else 0)


@pytest.mark.parametrize("resolution", [16, 37, 64, 90, 150])
def test_resize_crop_matches_pil_bilinear(resolution):
    image = np.random.default_rng(1).integers(0, 256, (90, 130, 3), dtype=np.uint8)  # noise: the hardest case
    box = crop_box(130, 90)
    got = resize_crop(torch.from_numpy(image).permute(2, 0, 1), box, resolution)
    assert got.shape == (3, resolution, resolution) and got.dtype == torch.uint8
    assert got.permute(1, 2, 0).is_contiguous()  # channels-last
    got = got.permute(1, 2, 0).numpy().astype(int)
    cropped = Image.fromarray(image).crop(box)
    ref = np.asarray(cropped.resize((resolution, resolution), Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(got - ref).max() <= 1  # torch's uint8 antialiased bilinear is a port of PIL's filter
    # the old path resized with box= and PIL then reads pixels just outside the box: only the border ring may differ
    boxed = np.asarray(Image.fromarray(image).resize((resolution, resolution), Image.Resampling.BILINEAR, box=box))
    assert np.abs(got - boxed.astype(int))[1:-1, 1:-1].max() <= 1
    assert np.abs(got - boxed).mean() < 0.5
    if resolution == 90:  # box already R across: a plain crop, pixel for pixel
        assert np.array_equal(got, np.asarray(cropped))


def test_resize_runs_on_one_thread_and_restores_the_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_dct_scale_follows_pils_draft_rule():
    data = encode_image(_smooth_image(300, 450), "jpeg")
    for resolution in (8, 20, 37, 64, 100, 150, 299, 300, 400):
        box = crop_box(450, 300)
        with Image.open(io.BytesIO(data)) as im:
            want = (max(1, 450 * resolution // 300), max(1, 300 * resolution // 300))
            drafted = im.draft("RGB", want) if resolution < 300 else None
            expected = 1 if drafted is None else round(450 / drafted[1][2])
        assert dct_scale((450, 300), box, resolution) == expected


def test_full_decode_path_stays_close_to_pil_with_box():
    image = _smooth_image(300, 450)
    data = encode_image(image, "jpeg")
    box = crop_box(450, 300)
    with Image.open(io.BytesIO(data)) as im:
        decoded = im.convert("RGB")
    for resolution in (100, 150, 256):  # dct_scale 2 or 1: full decode + torch resize
        assert dct_scale((450, 300), box, resolution) < MIN_DCT_SCALE
        got = load_image_crop(data, box, resolution, (450, 300)).permute(1, 2, 0).numpy().astype(float)
        ref = np.asarray(decoded.resize((resolution, resolution), Image.Resampling.BILINEAR, box=box))
        assert np.abs(got - ref).mean() < 0.5  # uint8 levels
    with pytest.raises(ValueError, match="segment map is 400x300"):
        load_image_crop(data, box, 100, (400, 300))


def _renumber_brute_force(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    expected = np.zeros_like(labels)
    for y in range(labels.shape[0]):
        for x in range(labels.shape[1]):
            for new, old in enumerate(keep, 1):
                if labels[y, x] == old:
                    expected[y, x] = new
    return expected


@pytest.mark.parametrize("values", [[0, 3, 7, 8, 200, 255], [0, 1, 2, 3], [1, 2]])
@pytest.mark.parametrize("with_histogram", [False, True])
def test_renumber_matches_a_brute_force_loop(values, with_histogram):
    rng = np.random.default_rng(2)
    for trial in range(21):
        labels = rng.choice(values, size=(13, 17)).astype(np.uint8)
        present = np.unique(labels)
        if trial == 20:  # all segments kept: the usual case
            keep = present[present > 0]
        else:
            keep = np.sort(rng.choice(present, size=int(rng.integers(0, len(present) + 1)), replace=False))
        histogram = np.bincount(labels.ravel(), minlength=256) if with_histogram else None
        got = renumber(labels, keep, histogram)
        expected = _renumber_brute_force(labels, keep)
        assert got.dtype == np.uint8 and np.array_equal(got, expected)
        for new, old in enumerate(keep, 1):  # every kept segment keeps all of its pixels
            assert int((got == new).sum()) == int((labels == old).sum())
        # the fast path (no copy) exactly when told the histogram and every value present is already its number
        assert (got is labels) == (with_histogram and np.array_equal(expected, labels))
    if with_histogram and values != [0, 3, 7, 8, 200, 255]:
        assert got is labels  # trial 20 on stored indices 1..k


def test_uint8_samples_convert_on_the_device_to_the_float_path(demo_shards):
    floats = list(ShardDataset(str(demo_shards), 40, shuffle_buffer=0))
    raw = list(ShardDataset(str(demo_shards), 40, shuffle_buffer=0, uint8=True))
    assert [s["key"] for s in raw] == [s["key"] for s in floats]
    for s, f in zip(raw, floats, strict=True):
        assert s["pixel_values"].dtype == torch.uint8 and s["pixel_values"].shape == (3, 40, 40)
        assert s["label_map"].dtype == torch.uint8 and torch.equal(s["label_map"].long(), f["label_map"])
        assert int(s["pixel_values"].max()) > 128  # 0..255 levels, not a [-1, 1] float cast to uint8
        torch.testing.assert_close(s["segment_embeddings"], f["segment_embeddings"], rtol=0, atol=0)
    batch = collate(raw)
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (12, 3, 40, 40)
    assert all(s["pixel_values"].permute(1, 2, 0).is_contiguous() for s in raw)  # channels-last samples ...
    assert batch["pixel_values"].is_contiguous(memory_format=torch.channels_last)  # ... stacked as they lie
    assert torch.equal(batch["pixel_values"], torch.stack([s["pixel_values"] for s in raw]))
    pixels = to_model_input(batch["pixel_values"], "cpu")
    assert pixels.is_contiguous()  # planar for the model
    reference = batch["pixel_values"].numpy().astype(np.float64) / 127.5 - 1.0  # independent float64 formula
    assert pixels.dtype == torch.float32 and -1.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    np.testing.assert_allclose(pixels.numpy(), reference, rtol=0, atol=1e-6)
    old = collate(floats)["pixel_values"]
    assert old.is_contiguous()  # the float path stays planar
    torch.testing.assert_close(pixels, old, rtol=0, atol=0)  # the same float32 arithmetic as the dataset's
    half = to_model_input(batch["pixel_values"], "cpu", torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, old.to(torch.bfloat16))
    assert to_model_input(old, "cpu", torch.float16).dtype == torch.float16  # float input: moved and cast
    with pytest.raises(ValueError, match="pixel_values"):
        to_model_input(batch["label_map"].long())


def test_every_segment_survives_a_crop_that_keeps_it(tmp_path):
    rng = np.random.default_rng(3)
    seg_map = np.zeros((48, 64), np.uint8)
    seg_map[:, :8] = 4  # only in the left margin the centred crop removes
    for index in (1, 2, 3, 5, 6):
        y, x = rng.integers(0, 44), rng.integers(8, 52)
        seg_map[y : y + 1 + index % 3, x : x + 1 + index % 4] = index  # tiny segments, one 1 x 1 px
    image = _smooth_image(48, 64)
    _write_shard(tmp_path / "a.parquet", [_row("x", image, seg_map)])
    (s,) = list(ShardDataset(str(tmp_path), 48, shuffle_buffer=0, uint8=True))  # box 48 px across = R: no resize
    cropped = seg_map[:, 8:56]
    kept = [i for i in range(1, 256) if (cropped == i).any()]
    assert 4 not in kept and int(s["num_segments"]) == len(kept)
    for new, old in enumerate(kept, 1):
        assert s["segment_embeddings"][new - 1, 0] == old
        assert torch.equal(s["label_map"] == new, torch.from_numpy(cropped == old))
    assert np.array_equal(s["pixel_values"].permute(1, 2, 0).numpy(), image[:, 8:56])  # PNG + no-op resize: exact


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("uint8", [True, False])
def test_decode_threads_yield_the_same_samples_in_the_same_order(resharded, uint8):
    def samples(threads: int) -> list[dict]:
        dataset = ShardDataset(str(resharded), 24, shuffle_buffer=4, seed=5, resample_segments=True,
                               uint8=uint8, decode_threads=threads)
        dataset.set_epoch(1)
        return list(dataset)

    before = torch.get_num_threads()
    one = samples(1)
    for threads in (2, 3):
        got = samples(threads)
        assert [s["key"] for s in got] == [s["key"] for s in one]
        assert all(_tensors_equal(a, b) for a, b in zip(got, one, strict=True))
    assert torch.get_num_threads() == before  # the decode threads' one-thread setting stays in them


def test_decode_threads_in_dataloader_workers_match_the_main_process(resharded):
    def dataset(threads: int) -> ShardDataset:
        return ShardDataset(str(resharded), 24, shuffle_buffer=0, uint8=True, decode_threads=threads)

    plain = {s["key"]: s for s in dataset(1)}
    loader = torch.utils.data.DataLoader(dataset(2), batch_size=2, num_workers=2, collate_fn=collate)
    seen = []
    for batch in loader:  # the worker collate (shared memory) keeps the channels-last layout and the values
        assert batch["pixel_values"].is_contiguous(memory_format=torch.channels_last)
        for i, key in enumerate(batch["key"]):
            seen.append(key)
            assert torch.equal(batch["pixel_values"][i], plain[key]["pixel_values"])
            assert torch.equal(batch["label_map"][i], plain[key]["label_map"])
            assert torch.equal(batch["segment_embeddings"][i], plain[key]["segment_embeddings"])
    assert sorted(seen) == sorted(plain)
    with pytest.raises(ValueError, match="decode_threads"):
        dataset(0)


def test_threaded_map_keeps_order_raises_and_stops_early():
    def slow_square(x: int) -> int:
        time.sleep(0.002 * (3 - x % 3))  # later items finish first
        return x * x

    assert list(threaded_map(slow_square, range(30), 3)) == [x * x for x in range(30)]
    assert list(threaded_map(lambda x: x, [], 2)) == []

    def fail_at_7(x: int) -> int:
        if x == 7:
            raise ValueError("bad row 7")
        return x

    got = []
    with pytest.raises(ValueError, match="bad row 7"):
        for x in threaded_map(fail_at_7, range(20), 2):
            got.append(x)
    assert got == list(range(7))  # everything before the failure, in order
    pulled = []

    def items():
        for i in range(1000):
            pulled.append(i)
            yield i

    mapped = threaded_map(lambda x: x, items(), 2)
    assert [next(mapped) for _ in range(3)] == [0, 1, 2]
    mapped.close()  # a consumer that stops early: nothing more is read, the threads are joined
    assert len(pulled) == 3 + 2 * 2  # the 3 taken and the 4 in flight
    with pytest.raises(ValueError, match="ahead"):
        next(threaded_map(lambda x: x, range(3), 2, ahead=0))


@pytest.mark.parametrize("ahead", [None, 12])
def test_threaded_map_works_ahead_while_the_consumer_is_busy(ahead):
    done = []

    def work(x: int) -> int:
        done.append(x)
        return x

    mapped = threaded_map(work, range(100), 2, ahead)
    assert next(mapped) == 0
    time.sleep(0.3)  # the consumer trains on its batch; the threads finish what was submitted meanwhile
    expected = 1 + (2 * 2 if ahead is None else ahead)  # the item taken + the ones in flight
    assert sorted(done) == list(range(expected))
    assert list(mapped) == list(range(1, 100))


def _png_l(labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(labels.astype(np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


def test_jpeg_size_reads_the_frame_header_as_pil_does():
    rng = np.random.default_rng(5)
    exif = Image.Exif()
    exif[0x010E] = "x" * 300  # a long APP1 segment before the frame header
    for options in ({}, {"progressive": True}, {"exif": exif}, {"quality": 40, "optimize": True},
                    {"subsampling": 0}):
        for shape in ((1, 1), (37, 53), (384, 512)):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(buf, "JPEG", **options)
            with Image.open(io.BytesIO(buf.getvalue())) as im:
                assert jpeg_size(buf.getvalue()) == im.size, (options, shape)
    assert jpeg_size(b"\xff\xd8\xff\xda\x00\x08" + bytes(20)) is None  # a scan before any frame header
    assert jpeg_size(b"\xff\xd8\xff\xe0\x00") is None  # cut short


def test_a_corrupt_label_map_raises_an_error_the_loader_can_name():
    """A label PNG with corrupt image data must raise (the loader names the row), not end the process: torchvision
    0.29's decode_png segfaults on these, so label maps are decoded by PIL."""
    png = bytearray(_png_l(np.random.default_rng(1).integers(0, 9, (40, 50), dtype=np.uint8)))
    idat = png.index(b"IDAT") + 4
    for corrupt in (png[:idat] + b"\x00\x00" + png[idat + 2:],  # zlib header: invalid window size
                    png[:idat + 2] + bytes(len(png) - idat - 2)):  # the data zeroed: bad row filters
        with pytest.raises((OSError, ValueError)):
            load_label_crop(bytes(corrupt), 32)


def test_jpegs_over_pils_pixel_limit_are_refused_before_torchvision_decodes_them(monkeypatch):
    """torchvision's decoder has no decompression-bomb guard: the loader applies PIL's rule (refused above twice
    ``MAX_IMAGE_PIXELS``) to the frame header's size first; a JPEG whose frame header it cannot find (stray bytes,
    markers without a length before it, which libjpeg skips) goes to PIL, which checks what it opens."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(buf, "JPEG")
    small = buf.getvalue()
    assert decode_rgb(small).shape == (3, 16, 24)
    sof = next(i for i in range(2, len(small) - 1) if small[i] == 0xFF and small[i + 1] == 0xC0)
    bomb = bytearray(small)
    bomb[sof + 5:sof + 9] = (60000).to_bytes(2, "big") + (50000).to_bytes(2, "big")  # 50000 x 60000 declared
    with pytest.raises(ValueError, match=r"image of 50000 x 60000 pixels is over twice the .*-pixel limit"):
        decode_rgb(bytes(bomb))
    for hidden in (b"\x00", b"\xff\x01", b"\xff\xd0", b"\xff\xe0\x00\x00"):  # libjpeg skips these; jpeg_size stops
        disguised = bytes(bomb[:2]) + hidden + bytes(bomb[2:])
        assert jpeg_size(disguised) is None
        with pytest.raises((Image.DecompressionBombError, OSError)):  # PIL's bomb check, or it does not open it
            decode_rgb(disguised)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16 * 24 // 2 - 1)  # the limit is PIL's own setting
    with pytest.raises(ValueError, match="image of 24 x 16 pixels"):
        decode_rgb(small)


def test_reducing_the_label_crop_keeps_thin_segments_of_one_output_pixel_or_more():
    """Nearest sampling every 16th pixel steps over a 15 px wide pole (2 output pixels' worth of area at R = 32):
    the crop is then reduced by the ST rule instead, which keeps it; a map without such a segment stays nearest."""
    labels = np.zeros((512, 512), np.uint8)
    labels[256:, :] = 2
    labels[100:134, 9:24] = 1  # 15 x 34 px between the sampled columns 8 and 24; one output pixel: 16 x 16 px
    labels[300:302, 300:302] = 3  # 4 px: below one output pixel's worth, may vanish
    nearest = Image.fromarray(labels).resize((32, 32), Image.Resampling.NEAREST)
    assert 1 not in np.unique(np.asarray(nearest))  # what the loader did before
    small, size = load_label_crop(_png_l(labels), 32)
    got = np.asarray(small)
    assert size == (512, 512) and got.shape == (32, 32)
    assert {0, 1, 2} <= set(np.unique(got).tolist())
    want = downsample_label_map(torch.from_numpy(labels.astype(np.int64))[None], (32, 32))[0].numpy()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(load_label_crop(_png_l(labels), 32, np.array([1, 2, 3]))[0]), want)
    plain = labels.copy()
    plain[100:134, 9:24] = 0
    np.testing.assert_array_equal(np.asarray(load_label_crop(_png_l(plain), 32)[0]),
                                  np.asarray(Image.fromarray(plain).resize((32, 32), Image.Resampling.NEAREST)))


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_batches_leaves_out_exactly_the_first_batches_without_decoding_them(resharded, workers, monkeypatch):
    """A mid-epoch resume: the batches after the first k are those of the full iteration (shuffled, uneven worker
    shares: 5 / 4 rows in 2 workers; round-robin order), and the rows of the first k are never decoded."""
    def batches(skip: int) -> list[list[str]]:
        dataset = ShardDataset(str(resharded), 16, shuffle_buffer=4, seed=1, epoch=1)
        dataset.set_epoch(1)
        left_out = dataset.skip_batches(skip, 2, workers)
        assert left_out == skip if workers == 0 else skip - left_out < workers
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=workers, collate_fn=collate)
        return [list(batch["key"]) for batch in loader][skip - left_out :]

    full = batches(0)
    assert len(full) >= 5
    for skip in (1, 2, 3, len(full) - 1, len(full)):
        assert batches(skip) == full[skip:], skip
    if workers == 0:  # decoding counted in this process
        decoded = []
        original = ShardDataset._sample
        monkeypatch.setattr(ShardDataset, "_sample",
                            lambda self, raw: decoded.append(raw["key"]) or original(self, raw))
        assert batches(3) == full[3:]
        assert sorted(decoded) == sorted(k for batch in full[3:] for k in batch)
    with pytest.raises(ValueError, match="need batches >= 0"):
        ShardDataset(str(resharded), 16).skip_batches(-1, 2)
