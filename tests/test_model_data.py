"""ShardDataset: exact split over ranks x workers, shuffling, crop alignment, segment re-sampling, fsspec paths."""

from __future__ import annotations

import io

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from spatext.model.data import (
    ShardDataset,
    WorkUnit,
    assign_units,
    collate,
    crop_box,
    load_image_crop,
    resolve_files,
)
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
    fast = load_image_crop(data, box, 64, (450, 300))  # draft: decoded at 1/4 scale
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
