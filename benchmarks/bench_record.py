"""What every benchmark script shares: writing its JSON record, and the Beam set-ups its builds run in."""

from __future__ import annotations

import json
import os


def write_record(out: str, filename: str, record: dict) -> str:
    """Write `record` as indented JSON to `out`/`filename` (values JSON lacks as strings), say so, return the path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, filename)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2, default=str)
    print(f"wrote {path}")
    return path


def build_mode(mode: str) -> tuple[list[str], str]:
    """`in_process` (DirectRunner, one process, models loaded in it), `threads:N` (N worker threads in one process,
    one model for all of them) or `processes:N` (N worker processes, one model server shared by all of them:
    --model-sharing machine) -> (Beam args, model sharing)."""
    if mode == "in_process":
        return [], "process"
    name, _, workers = mode.partition(":")
    if name not in ("threads", "processes") or not workers.isdigit() or int(workers) < 1:
        raise ValueError(f"build mode {mode!r} is none of in_process, threads:N, processes:N")
    if name == "threads":
        return [f"--direct_num_workers={workers}", "--direct_running_mode=multi_threading"], "process"
    return [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"], "machine"
