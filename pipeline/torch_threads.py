"""How many intra-op threads torch uses in the build's worker processes (``--torch-threads``).

torch starts one intra-op thread per core in every process, and OpenMP gives every calling thread its own team. A
build that Beam runs in parallel (several DirectRunner workers; Dataflow's one SDK process per vCPU, each with many
bundle threads; Spark and Flink workers) then runs cores x processes x threads torch threads on cores that its
processes already keep busy: small per-image ops (a resize, CLIP's normalisation) wait on threads that are not
scheduled. A 256-sample demo build with 2 worker processes on 2 cores took 1.25x as long with torch's default as
with one thread per process (medians 17.2 s vs 13.7 s: benchmarks/torch_threads.py). So by default (auto) each worker
process uses one thread wherever Beam runs samples in parallel; a single DirectRunner worker keeps torch's default, and
so does a model server shared by a machine's processes (``--model-sharing machine``: the one process running models).
"""

from __future__ import annotations

import torch
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

AUTO = 0
# Beam's in-process runners as --runner may name them (any case, or by their module path)
LOCAL_RUNNERS = ("direct", "directrunner", "switchingdirectrunner", "fnapirunner", "bundlebasedirectrunner")
TORCH_DEFAULT = torch.get_num_threads()  # this process's own default, read at import: before a build changes it


def worker_torch_threads(requested: int, options: PipelineOptions) -> int | None:
    """Intra-op threads for each worker process: ``requested`` when > 0; auto (0): None (torch's default) for a
    DirectRunner job of one worker, else 1."""
    if requested < 0:
        raise ValueError(f"--torch-threads must be >= 0 (0: auto), got {requested}")
    if requested > AUTO:
        return requested
    runner = (options.view_as(StandardOptions).runner or "direct").rsplit(".", 1)[-1].lower()
    direct = options.view_as(DirectOptions)
    one_worker = direct.direct_num_workers in (None, 1) or (direct.direct_running_mode or "in_memory") == "in_memory"
    if runner in LOCAL_RUNNERS and one_worker:  # in_memory runs one worker whatever direct_num_workers says
        return None
    return 1


def apply_torch_threads(threads: int | None) -> None:
    """Set this process's torch intra-op threads (None: leave torch's setting)."""
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
