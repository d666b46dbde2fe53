"""The shards open with the tools users reach for: pyarrow.dataset, DuckDB, Hugging Face datasets (if installed)."""

from __future__ import annotations

import json

import duckdb
import pyarrow.dataset as ds
import pytest

from spatext.pipeline.schema import read_metadata, shard_schema


def test_pyarrow_dataset(demo_shards):
    dataset = ds.dataset(str(demo_shards / "shards"), format="parquet")
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    assert dataset.count_rows() == manifest["counts"]["accepted"] == 12
    assert dataset.schema.remove_metadata().equals(shard_schema().remove_metadata())
    assert read_metadata(dataset.schema)["clip_model"] == "spatext-tiny"
    table = dataset.to_table(columns=["key", "width"], filter=ds.field("width") > 0)
    assert table.num_rows == 12 and len(set(table.column("key").to_pylist())) == 12


def test_duckdb(demo_shards):
    pattern = str(demo_shards / "shards" / "*.parquet")
    ((rows, segments, dim),) = duckdb.sql(
        f"SELECT count(*), sum(len(segments)), max(len(image_embedding)) FROM read_parquet('{pattern}')"
    ).fetchall()
    assert rows == 12 and segments >= 12 and dim == 64
    labels = duckdb.sql(
        f"SELECT s.label, count(*) AS n FROM (SELECT unnest(segments) AS s FROM read_parquet('{pattern}')) "
        "GROUP BY s.label ORDER BY n DESC"
    ).fetchall()
    assert labels and all(isinstance(label, str) for label, _ in labels)
    assert sum(n for _, n in labels) == segments


def test_huggingface_datasets(demo_shards):
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is not installed in this environment")
    loaded = datasets.load_dataset("parquet", data_files=str(demo_shards / "shards" / "*.parquet"), split="train")
    assert len(loaded) == 12 and "segments" in loaded.column_names
