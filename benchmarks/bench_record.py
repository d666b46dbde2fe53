"""What every benchmark script shares: writing its JSON record, and the Beam set-ups its builds run in."""

from __future__ import annotations

import json
import math
import os


def write_record(out: str, filename: str, record: dict) -> str:
    """Write `record` as indented JSON to `out`/`filename` (values JSON lacks as strings, NaN and infinities as null:
    the bare NaN token json writes by default is not JSON), say so, return the path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, filename)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(_finite(record), handle, indent=2, default=str, allow_nan=False)
    print(f"wrote {path}")
    return path


def _finite(value):
    """`value` with every float that is NaN or infinite, at any depth of dicts, lists and tuples, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def build_mode(mode: str) -> tuple[list[str], dict]:
    """`in_process` (DirectRunner, one process, models loaded in it), `threads:N` (N worker threads in one process,
    one model for all of them) or `processes:N[:copiesM][:ownserver]` (N worker processes sharing model servers:
    --model-sharing machine; `copiesM`: M servers per model, --model-copies M; `ownserver`: each server a process of
    its own, --model-server process, not a thread of a worker) -> (Beam args, BuildConfig fields)."""
    single = {"model_sharing": "process", "model_copies": None, "model_server": "thread"}
    if mode == "in_process":
        return [], single
    name, _, rest = mode.partition(":")
    workers, *options = rest.split(":")
    copies = [o for o in options if o.startswith("copies")]
    valid = name in ("threads", "processes") and workers.isdigit() and int(workers) >= 1
    valid = valid and (not options or name == "processes") and len(set(options)) == len(options) and len(copies) <= 1
    valid = valid and all(o == "ownserver" or (o.startswith("copies") and o[6:].isdigit() and int(o[6:]) >= 1)
                          for o in options)
    if not valid:
        raise ValueError(f"build mode {mode!r} is none of in_process, threads:N, processes:N[:copiesM][:ownserver]")
    if name == "threads":
        return [f"--direct_num_workers={workers}", "--direct_running_mode=multi_threading"], single
    return [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"], {
        "model_sharing": "machine", "model_copies": int(copies[0][6:]) if copies else None,
        "model_server": "process" if "ownserver" in options else "thread"}
