"""Prior P: configs, identity at init, training beats the identity baseline on correlated pairs, save/load."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from spatext.locks import LOCK_FILE
from spatext.model.prior import (
    Prior,
    PriorConfig,
    list_prior_configs,
    load_prior,
    load_prior_config,
    save_prior,
)
from spatext.model.prior_train import heldout_mask, load_embedding_pairs, train_prior
from spatext.pipeline.keys import key_hash
from spatext.pipeline.schema import encode_image, encode_segment_map, shard_schema
from spatext.pipeline.weights import safetensors_bytes

D = 32
TINY = PriorConfig(name="test", hidden_dim=128, num_layers=2, expansion=2)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _write_pairs(folder, rows: int, seed: int = 0, files: int = 2) -> None:
    """Synthetic shards through the real schema: image = normalize(A @ text + noise) for a fixed random A."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(D, D)) / np.sqrt(D)
    text = _unit(rng.normal(size=(rows, D)))
    image = _unit(text @ mixing.T + 0.15 * rng.normal(size=(rows, D)) / np.sqrt(D))
    png, seg = encode_image(np.zeros((2, 2, 3), np.uint8), "png"), encode_segment_map(np.ones((2, 2), np.uint8))
    segment = {"index": 1, "area": 1.0, "bbox": [0, 0, 2, 2], "embedding": np.zeros(D, np.float16), "label": None,
               "score": None}
    schema = shard_schema({"embed_dim": D, "clip_model": "synthetic", "clip_pretrained": "none (random init)"})
    folder.mkdir(parents=True, exist_ok=True)
    for part, idx in enumerate(np.array_split(np.arange(rows), files)):
        table = pa.Table.from_pylist([
            {"key": f"s{i:06d}", "caption": "c", "image": png, "width": 2, "height": 2, "segment_map": seg,
             "segments": [segment], "image_embedding": image[i].astype(np.float16),
             "caption_embedding": text[i].astype(np.float16)} for i in idx
        ], schema=schema)
        pq.write_table(table, folder / f"part-{part}.parquet", row_group_size=500)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prior") / "build" / "shards"
    _write_pairs(folder, 3000)
    return folder.parent


def test_bundled_configs_load_as_fresh_copies(tmp_path):
    assert {"prior-tiny", "prior-base"} <= set(list_prior_configs())
    tiny = load_prior_config("prior-tiny")
    assert tiny.name == "prior-tiny" and tiny.embed_dim is None
    tiny.hidden_dim = 7
    assert load_prior_config("prior-tiny").hidden_dim != 7
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"hidden_dim": 64, "num_layers": 1}))
    assert load_prior_config(str(path)).hidden_dim == 64
    path.write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ValueError, match="unknown keys"):
        load_prior_config(str(path))
    with pytest.raises(ValueError, match="prior-tiny"):
        load_prior_config("prior-huge")
    with pytest.raises(ValueError, match="dropout"):
        PriorConfig(dropout=1.5)


def test_untrained_prior_is_the_identity():
    prior = Prior(PriorConfig(embed_dim=D, hidden_dim=64))
    text = torch.randn(5, D)
    torch.testing.assert_close(prior(text), F.normalize(text, dim=-1))
    with pytest.raises(ValueError, match="embed_dim"):
        Prior(PriorConfig())


def test_heldout_split_is_a_function_of_the_key():
    keys = [f"k{i}" for i in range(4000)]
    mask = heldout_mask(keys, 0.1)
    assert 0.08 < mask.mean() < 0.12
    flipped = heldout_mask(keys[::-1], 0.1)[::-1]
    np.testing.assert_array_equal(mask, flipped)


def test_a_small_split_holds_out_at_least_one_key_and_none_is_null(pairs_dir, tmp_path):
    keys = [f"k{i}" for i in range(8)]
    assert not (np.array([key_hash(k) % (1 << 32) for k in keys]) < 0.001 * (1 << 32)).any()  # the hash alone: none
    mask = heldout_mask(keys, 0.001)
    assert mask.sum() == 1 and keys[int(np.argmax(mask))] == min(keys, key=lambda k: key_hash(k) % (1 << 32))
    assert not heldout_mask(keys, 0.0).any() and not heldout_mask(keys[:1], 0.001).any()  # one key: it trains
    metrics = train_prior(str(pairs_dir), str(tmp_path / "p"), TINY, steps=2, batch_size=8, val_fraction=0.0)
    assert metrics["num_heldout"] == 0 and metrics["heldout_prior_cosine"] is None
    text = (tmp_path / "p" / "prior_metrics.json").read_text()
    assert "NaN" not in text and json.loads(text)  # strict JSON


def test_reads_only_the_embedding_pairs(pairs_dir):
    pairs = load_embedding_pairs(str(pairs_dir))
    assert len(pairs.keys) == 3000 and pairs.text.shape == (3000, D) and pairs.text.dtype == np.float16
    assert pairs.metadata["clip_model"] == "synthetic"


def test_trained_prior_beats_identity_on_held_out_rows(pairs_dir, tmp_path):
    out = tmp_path / "prior"
    metrics = train_prior(str(pairs_dir), str(out), TINY, steps=300, batch_size=256, lr=2e-3, seed=0)
    assert metrics["num_heldout"] > 200 and metrics["num_train"] + metrics["num_heldout"] == 3000
    assert abs(metrics["heldout_identity_cosine"]) < 0.1  # A is random: text alone says little
    assert metrics["heldout_prior_cosine"] > 0.8
    assert metrics["heldout_prior_cosine"] > metrics["heldout_mean_image_cosine"] + 0.5
    assert metrics["config"]["embed_dim"] == D and metrics["lineage"]["clip_model"] == "synthetic"
    assert json.loads((out / "prior_metrics.json").read_text())["heldout_prior_cosine"] == metrics[
        "heldout_prior_cosine"]
    assert json.loads((out / "prior_config.json").read_text())["hidden_dim"] == 128

    loaded = load_prior(str(out))
    text = torch.randn(4, D)
    again = load_prior(str(out / "prior.safetensors"))
    torch.testing.assert_close(loaded(text), again(text))
    assert not loaded.training
    state = safetensors.torch.load_file(str(out / "prior.safetensors"))  # plain tensors, no pickle
    assert set(state) == set(loaded.state_dict())


def test_training_is_deterministic_given_seed(pairs_dir, tmp_path):
    runs = {name: train_prior(str(pairs_dir), str(tmp_path / name), TINY, steps=20, batch_size=64, seed=seed)
            for name, seed in (("a", 1), ("b", 1), ("c", 2))}
    weights = {name: safetensors.torch.load_file(str(tmp_path / name / "prior.safetensors")) for name in runs}
    assert weights["a"].keys() == weights["b"].keys()
    assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])  # the same seed: same weights
    assert runs["a"]["heldout_prior_cosine"] == runs["b"]["heldout_prior_cosine"]
    assert any(not torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])  # another seed: others


def test_bad_arguments(pairs_dir, tmp_path):
    with pytest.raises(ValueError, match="embed_dim=16"):
        train_prior(str(pairs_dir), str(tmp_path), PriorConfig(embed_dim=16), steps=1)
    with pytest.raises(ValueError, match="val_fraction"):
        train_prior(str(pairs_dir), str(tmp_path), TINY, steps=1, val_fraction=1.0)
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="prior config"):
        load_prior(str(plain))


def test_command_line_entry_writes_the_outputs(pairs_dir, tmp_path):
    from spatext.model.prior_train import main

    argv = ["--data", str(pairs_dir), "--output", str(tmp_path / "cli"), "--steps", "5", "--batch-size", "32"]
    assert main(argv) == 0
    assert {p.name for p in (tmp_path / "cli").iterdir()} == {"prior.safetensors", "prior_config.json",
                                                             "prior_metrics.json", LOCK_FILE}  # the folder's lock
    before = (tmp_path / "cli" / "prior.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds a prior .*--overwrite to replace it"):
        main([*argv[:-4], "--steps", "1"])  # runs trained with it name this folder: not replaced silently
    assert (tmp_path / "cli" / "prior.safetensors").read_bytes() == before
    assert main([*argv, "--seed", "3", "--overwrite"]) == 0
    assert (tmp_path / "cli" / "prior.safetensors").read_bytes() != before


def test_train_prior_takes_the_flag_names_of_spatext_train():
    from spatext.model.prior_train import parse_args

    short = parse_args(["--data", "d", "--output", "o", "--steps", "7", "--batch-size", "3", "--lr", "0.5"])
    long = parse_args(["--data", "d", "--output", "o", "--max-train-steps", "7", "--train-batch-size", "3",
                       "--learning-rate", "0.5"])
    assert vars(short) == vars(long) and (long.steps, long.batch_size, long.lr) == (7, 3, 0.5)


def test_safetensors_files_are_byte_identical_across_saves(tmp_path) -> None:
    """safetensors writes its metadata in hash order, which changes from one save to the next; ours is sorted."""
    tensors = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(3, dtype=torch.float16)}
    metadata = {name: json.dumps({"value": i}) for i, name in enumerate("hgfedcba")}
    raw = {safetensors.torch.save(tensors, metadata=metadata) for _ in range(10)}
    ours = {safetensors_bytes(tensors, metadata) for _ in range(10)}
    assert len(raw) > 1 and len(ours) == 1  # the library's own bytes vary; ours do not
    data = ours.pop()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert list(header["__metadata__"]) == sorted(metadata)
    (tmp_path / "t.safetensors").write_bytes(data)
    with safetensors.safe_open(str(tmp_path / "t.safetensors"), "pt") as handle:
        assert handle.metadata() == metadata
        assert {k: handle.get_tensor(k).tolist() for k in handle.keys()} == {k: v.tolist() for k, v in tensors.items()}
    torch.manual_seed(0)
    prior = Prior(PriorConfig(**{**load_prior_config("prior-tiny").to_dict(), "embed_dim": 16}))
    for run in ("a", "b"):
        save_prior(prior, str(tmp_path / run), {"lineage": {"clip_model": "x", "shards": ["s1", "s2"]}})
    assert (tmp_path / "a" / "prior.safetensors").read_bytes() == (tmp_path / "b" / "prior.safetensors").read_bytes()


def test_a_diverging_prior_stops_and_a_nan_prior_is_refused(tmp_path) -> None:
    from spatext.model.checkpoint import DivergedError
    from spatext.model.prior_train import _fit
    from spatext.model.train_setup import load_prior_component

    config = PriorConfig(**{**load_prior_config("prior-tiny").to_dict(), "embed_dim": 16})
    torch.manual_seed(0)
    text, image = F.normalize(torch.randn(32, 16), dim=-1), F.normalize(torch.randn(32, 16), dim=-1)
    with pytest.raises(DivergedError, match=r"the prior's loss is nan at step \d+: training diverged \(with --lr "
                                            r"1e\+30\)"):
        _fit(Prior(config), text, image, steps=50, batch_size=8, lr=1e30, seed=0)
    prior = Prior(config)
    with torch.no_grad():
        next(prior.parameters()).fill_(float("nan"))
    save_prior(prior, str(tmp_path / "nan"))
    with pytest.raises(ValueError, match="holds NaN or infinite weights"):
        load_prior_component(str(tmp_path / "nan"), 16)


def test_a_damaged_prior_file_is_a_clear_error_and_a_cut_save_leaves_none(tmp_path, monkeypatch) -> None:
    """A prior file cut short (a save killed half-way) or of another format is a ValueError naming it, whether the
    weights or only the lineage are read; saving goes through a temporary name, so a failed save leaves no file."""
    from spatext.model.prior import load_prior_lineage

    torch.manual_seed(0)
    prior = Prior(PriorConfig(**{**load_prior_config("prior-tiny").to_dict(), "embed_dim": 16}))
    save_prior(prior, str(tmp_path / "good"), {"lineage": {"clip_model": "x"}})
    data = (tmp_path / "good" / "prior.safetensors").read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    cases = {"short": data[:4], "header_cut": data[: header - 5], "tensors_cut": data[: (header + len(data)) // 2],
             "huge_length": (1 << 62).to_bytes(8, "little") + data[8:], "not_json": data[:8] + b"\xff" * (header - 8),
             "json_list": (2).to_bytes(8, "little") + b"[]"}
    for name, damaged in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=f"{name}.safetensors' is (not a|a damaged) safetensors file"):
            load_prior(str(path))
        if name != "tensors_cut":  # the lineage is read from the header alone
            with pytest.raises(ValueError, match=f"{name}.safetensors' is not a safetensors file"):
                load_prior_lineage(str(path))
    assert load_prior_lineage(str(tmp_path / "good")) == {"clip_model": "x"}

    save_prior(prior, "memory://runs/p[v2]")  # an object store: written whole, no temporary name (no glob either)
    assert load_prior_lineage("memory://runs/p[v2]") == {} and load_prior("memory://runs/p[v2]") is not None
    real_open = open

    class FullDisk:
        """A file whose write stores half of the bytes, then fails as a full disk does."""

        def __init__(self, path, mode):
            self.handle = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

    import spatext.model.prior as prior_module

    save_prior(prior, str(tmp_path / "cut"))
    before = (tmp_path / "cut" / "prior.safetensors").read_bytes()
    monkeypatch.setattr(prior_module, "open", FullDisk, raising=False)
    with pytest.raises(OSError, match="No space left"):
        save_prior(prior, str(tmp_path / "cut"))
    assert (tmp_path / "cut" / "prior.safetensors").read_bytes() == before  # the previous save, whole
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["prior.safetensors", "prior_config.json"]
