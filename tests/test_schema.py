"""Schema v1 round trip: rows written through pyarrow/Parquet come back as the same arrays."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spatext.pipeline.records import Embeddings, Reject, Sample, SelectedSegment
from spatext.pipeline.schema import (
    REJECT_SCHEMA,
    SCHEMA_VERSION,
    read_metadata,
    reject_to_row,
    row_to_sample,
    sample_to_row,
    shard_schema,
)


def _sample(rng: np.random.Generator, dim: int = 8) -> tuple[Sample, Embeddings]:
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    segment_map = np.zeros((30, 40), dtype=np.uint8)
    segment_map[2:10, 3:20] = 1
    segment_map[15:29, 25:39] = 2
    segments = (
        SelectedSegment(1, float((segment_map == 1).mean()), (3, 2, 20, 10), "cat", 0.9),
        SelectedSegment(2, float((segment_map == 2).mean()), (25, 15, 39, 29), None, None),
    )
    vectors = rng.normal(size=(4, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sample = Sample("k1", "src.tar", "a caption", image, segment_map=segment_map, segments=segments)
    return sample, Embeddings(segments=vectors[:2], image=vectors[2], caption=vectors[3])


@pytest.mark.parametrize("image_format", ["png", "jpeg"])
def test_round_trip_through_parquet(tmp_path, image_format):
    rng = np.random.default_rng(0)
    sample, emb = _sample(rng)
    schema = shard_schema({"clip_model": "tiny", "embed_dim": 8})
    row = sample_to_row(sample, emb, image_format=image_format)
    table = pa.Table.from_pylist([row], schema=schema)
    pq.write_table(table, tmp_path / "x.parquet", compression="zstd")

    read = pq.read_table(tmp_path / "x.parquet")
    assert read.schema.remove_metadata().equals(schema.remove_metadata())
    meta = read_metadata(read.schema)
    assert meta["schema_version"] == SCHEMA_VERSION and meta["clip_model"] == "tiny" and meta["embed_dim"] == "8"
    back = row_to_sample(read.to_pylist()[0])
    assert back.key == "k1" and back.caption == "a caption"
    np.testing.assert_array_equal(back.segment_map, sample.segment_map)
    if image_format == "png":  # lossless
        np.testing.assert_array_equal(back.image, sample.image)
    else:
        assert back.image.shape == sample.image.shape
    assert [s["index"] for s in back.segments] == [1, 2]
    assert back.segments[0]["label"] == "cat" and back.segments[1]["label"] is None
    assert back.segments[0]["bbox"] == [3, 2, 20, 10]
    assert back.segments[0]["score"] == pytest.approx(0.9)
    # float16 storage: within half precision of the float32 originals
    np.testing.assert_allclose(back.segments[1]["embedding"], emb.segments[1], atol=1e-3)
    np.testing.assert_allclose(back.caption_embedding, emb.caption, atol=1e-3)
    assert read.column("segments").type.value_type.field("embedding").type == pa.list_(pa.float16())


def test_row_requires_matching_embeddings():
    sample, emb = _sample(np.random.default_rng(1))
    with pytest.raises(ValueError, match="segment embeddings"):
        sample_to_row(sample, Embeddings(emb.segments[:1], emb.image, emb.caption))


def test_reject_rows_fit_the_reject_schema():
    row = reject_to_row(Reject("k", "s.tar", "decode", "unreadable_image: bad"))
    table = pa.Table.from_pylist([row], schema=REJECT_SCHEMA)
    assert table.to_pylist() == [{"key": "k", "source": "s.tar", "stage": "decode", "reason": "unreadable_image: bad"}]
