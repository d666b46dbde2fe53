"""Schema v1 round trip: rows written through pyarrow/Parquet come back as the same arrays."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision.io import decode_png

from spatext.pipeline.records import Embeddings, Reject, Sample, SelectedSegment
from spatext.pipeline.schema import (
    REJECT_SCHEMA,
    SCHEMA_VERSION,
    encode_segment_map,
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


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes, int]]:
    """(type, data, stored CRC) of each chunk of a PNG file, parsed from the spec's layout."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, i = [], 8
    while i < len(data):
        length = int.from_bytes(data[i : i + 4], "big")
        kind, body = data[i + 4 : i + 8], data[i + 8 : i + 8 + length]
        chunks.append((kind, body, int.from_bytes(data[i + 8 + length : i + 12 + length], "big")))
        i += 12 + length
    return chunks


@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (29, 1), (513, 700)])
def test_segment_map_png_decodes_the_same_in_pil_and_libpng(shape):
    """The hand-written PNG is a standard one: PIL (its own decoder, with CRC checks) and libpng (torchvision) both
    read back every value 0..255, as a mode-L image."""
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    labels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    labels[: shape[0] // 2] = 3  # runs, as real maps have, besides noise
    png = encode_segment_map(labels)
    with Image.open(io.BytesIO(png)) as im:
        im.verify()  # chunk CRCs and structure
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "L" and im.size == (shape[1], shape[0])
        np.testing.assert_array_equal(np.array(im), labels)
    np.testing.assert_array_equal(decode_png(torch.frombuffer(bytearray(png), dtype=torch.uint8))[0].numpy(), labels)
    kinds = [kind for kind, _, _ in _png_chunks(png)]
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]
    for kind, body, crc in _png_chunks(png):
        assert zlib.crc32(kind + body) == crc


def test_segment_map_png_rows_are_unfiltered_and_as_small_as_pils():
    """Every row carries filter 0 (what makes encoding and decoding cheap), and a map of segments costs at most a
    few percent more bytes than PIL's adaptive filtering at the same zlib level."""
    labels = np.zeros((384, 512), dtype=np.uint8)
    yy, xx = np.mgrid[:384, :512]
    labels[(xx - 200) ** 2 + (yy - 150) ** 2 < 90**2] = 1
    labels[(xx + 2 * yy > 700) & (xx < 450)] = 2
    labels[300:360, 20:500:7] = 3  # thin poles
    png = encode_segment_map(labels)
    rows = np.frombuffer(zlib.decompress(_png_chunks(png)[1][1]), dtype=np.uint8).reshape(384, 513)
    assert not rows[:, 0].any()
    buf = io.BytesIO()
    Image.fromarray(labels).save(buf, format="PNG", compress_level=1)
    assert len(png) <= 1.1 * len(buf.getvalue())


@pytest.mark.parametrize("bad", [np.zeros((0, 4), np.uint8), np.zeros((3, 4, 1), np.uint8),
                                 np.full((2, 2), 256, np.int32), np.full((2, 2), -1, np.int64),
                                 np.zeros((2, 2), np.float32)])
def test_segment_map_png_refuses_what_it_cannot_store(bad):
    with pytest.raises(ValueError, match="segment_map must"):
        encode_segment_map(bad)


def test_segment_map_png_takes_small_integers_of_any_width_and_bools():
    labels = np.array([[0, 1], [2, 255]], dtype=np.int64)
    with Image.open(io.BytesIO(encode_segment_map(labels))) as im:
        np.testing.assert_array_equal(np.array(im), labels)
    mask = np.array([[True, False, True]])
    with Image.open(io.BytesIO(encode_segment_map(mask))) as im:
        np.testing.assert_array_equal(np.array(im), [[1, 0, 1]])
