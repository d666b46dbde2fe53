"""Keys unique across the input set: which copy of a key that several input units hold is kept (first wins).

Readers drop duplicates inside one unit (a tar, a parquet file, a captions.jsonl). Across units a key can repeat too
(the same tar passed twice, two sources naming samples alike), and shards must hold each key once. At scale this is
a shuffle of keys only: (key, unit) pairs -> GroupByKey -> for each key held by more than one unit, the winning unit,
the smallest source name. The choice depends on the input set alone, not on the order of arrival, so every runner,
worker count and retry keeps the same copy. The winners (one entry per duplicated key: rare) are a side input of the
write step, which turns each other copy's row into a `read/duplicate_key` reject of its own unit there, after the
write's existing group-by-unit shuffle: no extra materialisation of images, and accepted + rejected = read still
holds per unit.

On --resume the units completed earlier are not read again; their keys come from their shards and rejects tables,
so a key they hold still wins over a copy in a unit read now. Only their keys that may collide with a key read now
enter the shuffle: a side input holds the 64-bit hashes of the keys read now (``KeyHashes``: 8 bytes a key, sorted),
and completed keys whose hash is not among them are dropped where they are read. Without that filter every job of
an ``--units-per-run`` build would shuffle the keys of all earlier jobs again (quadratic in the number of jobs); a
hash collision only lets a key through to the exact comparison.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import apache_beam as beam
import numpy as np

from spatext.pipeline.keys import key_hash
from spatext.pipeline.parquet_files import streaming_parquet
from spatext.pipeline.records import RawSample, Reject

DUPLICATE_KEY = "duplicate_key"


_DONE, _READ = 0, 1  # a completed unit's copy of a key outranks any copy read now: it is written already


def key_source(sample: RawSample) -> tuple[str, tuple[int, str]]:
    """(key, (rank, unit)) of a sample as read."""
    return sample.key, (_READ, sample.source)


def winner(element: tuple[str, Iterable[tuple[int, str]]]) -> Iterator[tuple[str, str]]:
    """(key, its (rank, unit)s) -> (key, winning unit) when more than one unit holds the key; nothing otherwise.

    The winner is a unit completed earlier if any (its row is written; usually also the first by name, since units
    run in name order: see ``--units-per-run``), else the unit whose name sorts first."""
    key, ranked = element
    distinct = set(ranked)
    if len({source for _, source in distinct}) > 1:
        yield key, min(distinct)[1]


class KeyHashes(beam.CombineFn):
    """Keys -> their sorted, distinct 64-bit hashes as one uint64 array (8 bytes a key: a side input that stays
    small where a list of Python ints or strings would not). Accumulator: (sorted arrays, hashes not yet folded)."""

    FOLD = 1 << 16

    def create_accumulator(self) -> tuple[list[np.ndarray], list[int]]:
        return [], []

    def add_input(self, accumulator: tuple[list[np.ndarray], list[int]], key: str) -> tuple:
        arrays, loose = accumulator
        loose.append(key_hash(key))
        if len(loose) >= self.FOLD:
            arrays.append(np.unique(np.array(loose, dtype=np.uint64)))
            loose.clear()
            if len(arrays) > 8:
                arrays[:] = [np.unique(np.concatenate(arrays))]
        return accumulator

    def merge_accumulators(self, accumulators: Iterable[tuple]) -> tuple[list[np.ndarray], list[int]]:
        return [np.unique(np.concatenate([self.extract_output(a) for a in accumulators]))], []

    def extract_output(self, accumulator: tuple[list[np.ndarray], list[int]]) -> np.ndarray:
        arrays, loose = accumulator
        return np.unique(np.concatenate([*arrays, np.array(loose, dtype=np.uint64)]))


def done_keys(done: tuple[str, str, str], read_now: np.ndarray | None = None) -> Iterator[tuple[str, tuple[int, str]]]:
    """(unit, table, parquet file) of a completed unit -> the (key, (rank, unit)) pairs of the samples it read;
    with `read_now` (sorted key hashes, ``KeyHashes``), only those of keys whose hash is among them.

    `table` is 'shards' (every row a sample) or 'rejects' (rows of stage read are not samples and are skipped).
    """
    source, table, path = done
    if read_now is not None and not len(read_now):  # nothing is read now: no key can repeat one of this unit's
        return
    columns = ["key"] if table == "shards" else ["key", "stage"]  # write.SHARDS_DIR (write imports this module)
    with streaming_parquet(path) as parquet:  # only these columns' chunks: a remote shard is not downloaded whole
        rows = parquet.read(columns=columns).to_pylist()
    keys = [row["key"] for row in rows if row.get("stage", "") != "read"]
    if read_now is not None:
        hashes = np.fromiter((key_hash(key) for key in keys), dtype=np.uint64, count=len(keys))
        keys = [key for key, kept in zip(keys, np.isin(hashes, read_now), strict=True) if kept]
    for key in keys:
        yield key, (_DONE, source)


def duplicate_reject(row_key: str, source: str, first: str) -> Reject:
    """The reject of a copy of `row_key` in `source` whose key unit `first` holds too."""
    return Reject(row_key, source, "read", f"{DUPLICATE_KEY}: first read from {first}")


class DuplicateKeys(beam.PTransform):
    """RawSamples -> (key, winning unit) for every key that more than one input unit holds.

    `done`: (unit, table, parquet file) of units an earlier run completed (resume), whose keys count too.
    """

    def __init__(self, done: Sequence[tuple[str, str, str]] = ()) -> None:
        super().__init__()
        self.done = list(done)

    def expand(self, samples):
        keys = samples | "KeyAndUnit" >> beam.Map(key_source)
        if self.done:
            read_now = (keys | "Keys" >> beam.Keys()
                        | "KeyHashes" >> beam.CombineGlobally(KeyHashes()))
            earlier = (
                samples.pipeline
                | "CompletedTables" >> beam.Create(self.done)
                | "CompletedKeys" >> beam.FlatMap(done_keys, read_now=beam.pvalue.AsSingleton(read_now))
            )
            keys = (keys, earlier) | "AllKeys" >> beam.Flatten()
        return keys | "GroupKeys" >> beam.GroupByKey() | "FirstUnitWins" >> beam.FlatMap(winner)
