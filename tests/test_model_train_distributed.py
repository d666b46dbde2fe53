"""`spatext train` with two processes: real data-parallel training on CPU (torchrun, gloo), tiny configs, demo shards.

Each run is `python -m torch.distributed.run --standalone --nproc_per_node 2 -m spatext.model.train ...` in a
subprocess (10-20 s on 2 cores, most of it two interpreters importing torch and diffusers). What is checked is what
the run wrote: each rank's sample keys (`--log-sample-keys`), the ranks' weight fingerprints in run.json against the
checkpoint, the loss log and checkpoints written once, every rank's RNG state in a checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.torch

from spatext.model.checkpoint import COUNTERS, STATE_FILE
from spatext.model.shard_files import resolve_files
from spatext.model.tiny_base import write_tiny_base_model
from spatext.model.train_record import weights_sha256

STEPS = 4
TIMEOUT_S = 180  # a run takes 10-20 s; a hang (ranks in different collectives) must not take the suite


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return write_tiny_base_model(str(tmp_path_factory.mktemp("base") / "tiny-sd"))


def launch(data: str, base: str, out, config: str = "latent-tiny", steps: int = STEPS, *extra: str):
    """`spatext train` on 2 CPU processes; the finished process (its output is shown when it failed)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "spatext.model.train", "--data", data, "--config", config, "--base-model", base, "--output", str(out),
            "--max-train-steps", str(steps), "--train-batch-size", "2", "--learning-rate", "2e-3", "--seed", "3",
            "--log-sample-keys", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:  # e.g. ranks waiting in different collectives
            proc.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers (each in a session of its own)
            stdout, stderr = proc.communicate(timeout=60)
            pytest.fail(f"2-process run still going after {TIMEOUT_S} s (hung?):\n{stderr[-6000:]}")
    done = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
    assert done.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return done


def _keys(run, rank: int) -> list[dict]:
    with open(os.path.join(run, "logs", f"keys-rank-{rank}.csv")) as f:
        return [{"step": int(r["step"]), "epoch": int(r["epoch"]), "key": r["key"]} for r in csv.DictReader(f)]


def _by_epoch(rows: list[dict]) -> dict[int, list[str]]:
    out = defaultdict(list)
    for row in rows:
        out[row["epoch"]].append(row["key"])
    return out


def _record(run) -> dict:
    with open(os.path.join(run, "run.json")) as f:
        return json.load(f)


def _loss_rows(run) -> list[tuple[str, str, str]]:
    with open(os.path.join(run, "logs", "loss.csv")) as f:
        return [(r["step"], r["loss"], r["epoch"]) for r in csv.DictReader(f)]


def _data_keys(data: str) -> list[str]:
    return sorted(k for path in resolve_files(data) for k in pq.read_table(path, columns=["key"])["key"].to_pylist())


@pytest.fixture(scope="module")
def straight(demo_shards, base, tmp_path_factory) -> tuple[str, subprocess.CompletedProcess]:
    """4 steps on 2 processes, batch 2 per rank: 12 rows = 3 steps per epoch; checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("dist") / "straight"
    return str(out), launch(str(demo_shards), base, out, "latent-tiny", STEPS, "--checkpointing-steps", "2")


def test_two_processes_split_the_epoch_and_keep_identical_weights(straight, demo_shards):
    run, done = straight
    assert done.stdout.count("spatext train:") == 1  # rank 0 speaks for the run
    record = _record(run)
    assert record["accelerate"]["num_processes"] == 2 and record["global_step"] == STEPS
    # data: each rank its own half of epoch 0, together every row once; step 4 starts epoch 1, again disjoint
    rows = [_keys(run, rank) for rank in (0, 1)]
    epochs = [_by_epoch(r) for r in rows]
    assert [len(e[0]) for e in epochs] == [6, 6] and not set(epochs[0][0]) & set(epochs[1][0])
    assert sorted(epochs[0][0] + epochs[1][0]) == _data_keys(str(demo_shards))
    assert [len(e[1]) for e in epochs] == [2, 2] and not set(epochs[0][1]) & set(epochs[1][1])
    assert [[r["step"] for r in rank_rows] for rank_rows in rows] == [[1, 1, 2, 2, 3, 3, 4, 4]] * 2
    assert record["ranks"]["samples"] == [8, 8]
    # gradients averaged across ranks: both replicas end bit-identical, equal to the checkpoint rank 0 wrote
    checkpoints = os.path.join(run, "checkpoints")
    final = safetensors.torch.load_file(os.path.join(checkpoints, f"checkpoint-{STEPS}", "model.safetensors"))
    halfway = safetensors.torch.load_file(os.path.join(checkpoints, "checkpoint-2", "model.safetensors"))
    fingerprints = record["ranks"]["weights_sha256"]
    assert fingerprints == [weights_sha256(final)] * 2 and record["ranks"]["weights_in_sync"] is True
    assert weights_sha256(halfway) != fingerprints[0]
    # written once: one loss row per step (the mean over ranks), one checkpoint per checkpointing step
    assert [int(step) for step, _, _ in _loss_rows(run)] == list(range(1, STEPS + 1))
    assert sorted(os.listdir(checkpoints)) == ["checkpoint-2", f"checkpoint-{STEPS}"]
    for name in os.listdir(checkpoints):  # every rank's RNG state is in every checkpoint
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(os.path.join(checkpoints, name)))
    with open(os.path.join(checkpoints, f"checkpoint-{STEPS}", STATE_FILE)) as f:
        state = json.load(f)
    assert {k: state[k] for k in COUNTERS} == {"global_step": 4, "epoch": 1, "batch_in_epoch": 1, "micro_step": 4}
    assert state["samples"] == [8, 8]  # per rank, what a resumed run's ranks.samples continues from


@pytest.fixture(scope="module")
def uneven(demo_shards, tmp_path_factory) -> str:
    """9 demo rows as shards of 2, 3 and 4 rows: the ranks read 4 and 5 rows an epoch, 2 and 3 batches of 2."""
    table = pa.concat_tables([pq.read_table(path) for path in resolve_files(str(demo_shards))])
    out = tmp_path_factory.mktemp("uneven") / "shards"
    out.mkdir()
    start = 0
    for i, rows in enumerate((2, 3, 4)):
        part = table.slice(start, rows)
        pq.write_table(pa.Table.from_batches(part.to_batches(), schema=table.schema), out / f"part-{i}.parquet")
        start += rows
    return str(out.parent)


def test_uneven_shards_keep_the_ranks_in_the_same_epoch(uneven, base, tmp_path):
    out = tmp_path / "uneven"
    done = launch(uneven, base, out, "pixel-tiny", STEPS, "--checkpointing-steps", "0")
    assert "batches per rank [2, 3]; every rank trains on 2" in done.stderr
    rows = [_keys(out, rank) for rank in (0, 1)]
    epoch_of_step = [{r["step"]: r["epoch"] for r in rank_rows} for rank_rows in rows]
    assert epoch_of_step[0] == epoch_of_step[1] == {1: 0, 2: 0, 3: 1, 4: 1}  # 2 steps per epoch on both ranks
    for epoch in (0, 1):  # never the same row twice in an epoch, whichever rank reads it
        keys = [_by_epoch(rank_rows)[epoch] for rank_rows in rows]
        assert len(set(keys[0] + keys[1])) == len(keys[0] + keys[1]) == 8
    record = _record(out)
    assert record["epoch"] == 1 and record["ranks"]["weights_in_sync"] is True


@pytest.mark.slow
def test_a_resumed_two_process_run_matches_an_uninterrupted_one(straight, demo_shards, base, tmp_path):
    run, _ = straight
    out = tmp_path / "resumed"
    launch(str(demo_shards), base, out, "latent-tiny", 2, "--checkpointing-steps", "2")
    launch(str(demo_shards), base, out, "latent-tiny", STEPS, "--checkpointing-steps", "2",
           "--resume-from-checkpoint", "latest")
    assert _record(out)["ranks"]["weights_sha256"] == _record(run)["ranks"]["weights_sha256"]
    assert _record(out)["ranks"]["samples"] == [8, 8]  # both launches: steps 1-2 and 3-4
    assert _loss_rows(out) == _loss_rows(run)
    assert [_keys(out, rank) for rank in (0, 1)] == [_keys(run, rank) for rank in (0, 1)]
