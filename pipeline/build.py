"""The main job: corpus -> decode -> segment -> select -> CLIP-embed -> Parquet shards (+ rejects, manifest).

Run it as `spatext build ...` or, the usual Beam way, `python -m spatext.pipeline.build ...`. Flags the build does
not know are Beam pipeline options (--runner, --direct_running_mode, --project, --setup_file, ...).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import posixpath
import sys
import time
import warnings
from collections.abc import Iterator

import apache_beam as beam
import torch
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineResult

from spatext.device import check_device
from spatext.locks import folder_lock
from spatext.paths import delete_files
from spatext.pipeline.batch_failures import SplitFailures
from spatext.pipeline.clip import RANDOM_INIT_LABEL as CLIP_RANDOM_INIT_LABEL
from spatext.pipeline.clip import ClipSpec, check_pretrained, clip_embed_dim
from spatext.pipeline.config import RESUME_MAY_CHANGE, BuildConfig, parse_args
from spatext.pipeline.decode import Decode, DecodeOptions
from spatext.pipeline.dedupe import DuplicateKeys
from spatext.pipeline.embed import ClipEmbedder
from spatext.pipeline.model_stage import stop_started_servers
from spatext.pipeline.read import COUNTS, REJECTS, ReadCorpus, check_input, has_annotations, match_files
from spatext.pipeline.records import Reject, rejects_from_failed_batch
from spatext.pipeline.schema import sample_to_row, shard_schema
from spatext.pipeline.segment import SegmenterModelHandler
from spatext.pipeline.segmenters.base import SegmenterSpec, may_read_ground_truth, weights_label
from spatext.pipeline.selection import Select, SelectOptions
from spatext.pipeline.torch_threads import worker_torch_threads
from spatext.pipeline.write import (
    BUILD_CONFIG,
    OWN_FILES,
    REJECTS_DIR,
    SHARDS_DIR,
    UNITS_DIR,
    WriteUnits,
    clear_output,
    completed_tables,
    existing_build,
    foreign_files,
    input_file,
    input_stamp,
    list_files,
    read_json,
    read_manifest,
    read_markers,
    unreferenced_files,
    write_atomic,
    write_manifest,
)
from spatext.versions import package_version, package_versions

logger = logging.getLogger(__name__)


def resolve_segmenter(config: BuildConfig) -> str:
    """The concrete segmenter: `auto` means the corpus's ground truth when it has some, else mask2former."""
    if config.segmenter != "auto":
        return config.segmenter
    return "annotations" if has_annotations(config.input, config.input_format) else "mask2former"


def decode_options_for(config: BuildConfig, segmenter: str) -> DecodeOptions:
    """The decode stage's options. Ground truth is decoded only for a segmenter that may use it: the `annotations`
    backend requires it; a model backend drops it unread (on an annotated corpus that saves the panoptic PNG decode,
    ~1.8 ms per 512 px sample, and its id map in every batch sent to a shared model server); a segmenter of your own
    gets it whenever the corpus has it."""
    return DecodeOptions(config.image_size, config.max_pixels, require_annotation=segmenter == "annotations",
                         keep_annotation=may_read_ground_truth(segmenter))


def segmenter_spec(config: BuildConfig, name: str) -> SegmenterSpec:
    """The segmenter part of the config."""
    return SegmenterSpec(
        name=name,
        weights=config.segmenter_weights,
        config=config.segmenter_config,
        threshold=config.segmenter_threshold,
        mask_threshold=config.segmenter_mask_threshold,
        overlap_threshold=config.segmenter_overlap_threshold,
        processor_size=config.segmenter_processor_size,
        device=config.device,
        batch_size=config.segmenter_batch_size,
        precision=config.precision,
    )


def clip_spec(config: BuildConfig) -> ClipSpec:
    """The CLIP part of the config."""
    return ClipSpec(
        model=config.clip_model, pretrained=config.clip_pretrained, device=config.device,
        batch_size=config.clip_batch_size, precision=config.precision,
    )


def shard_metadata(config: BuildConfig, segmenter: str) -> dict[str, object]:
    """The key-value metadata every shard carries (DESIGN.md: what made these rows)."""
    return {
        "clip_model": config.clip_model,
        "clip_pretrained": CLIP_RANDOM_INIT_LABEL if config.clip_pretrained == "none" else config.clip_pretrained,
        "embed_dim": clip_embed_dim(config.clip_model),
        "segmenter": segmenter,
        "segmenter_weights": weights_label(segmenter_spec(config, segmenter)),
        "min_area": config.min_area,
        "k_min": config.k_min,
        "k_max": config.k_max,
        "seed": config.seed,
        "image_size": config.image_size,
        "image_format": config.image_format,
        "package_version": package_version("spatext") or "unknown",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def lineage(config: BuildConfig, segmenter: str) -> dict:
    """Where the rows came from and what software made them."""
    packages = ("spatext", "apache-beam", "torch", "open_clip_torch", "transformers", "pyarrow")
    return {
        "input": config.input,
        "segmenter": segmenter,
        "python": platform.python_version(),
        "packages": package_versions(packages),
    }


def _keyed_row(pair, image_format: str, jpeg_quality: int) -> tuple[str, dict]:
    """(sample, embeddings) -> (its input unit, its Parquet row)."""
    sample, embeddings = pair
    return sample.source, sample_to_row(sample, embeddings, image_format, jpeg_quality)


def _keyed_reject(reject: Reject) -> tuple[str, Reject]:
    """A reject keyed by its input unit."""
    return reject.source, reject


def build_pipeline(
    p: beam.Pipeline, config: BuildConfig, started_at: float, skip: frozenset[str] = frozenset(), manifest: bool = True,
    earlier_jobs: int = 0,
) -> None:
    """Add the build's labelled steps to pipeline `p` (input units in `skip` are already complete, or left to
    another job of --units-per-run); `manifest`: this job writes manifest.json (the last job of a build), counting
    `earlier_jobs` units completed by this launch's earlier jobs as this run's too."""
    segmenter = resolve_segmenter(config)
    decode_options = decode_options_for(config, segmenter)
    select_options = SelectOptions(config.min_area, config.k_min, config.k_max, config.seed)
    schema = shard_schema(shard_metadata(config, segmenter))

    read = p | "Read" >> ReadCorpus(config.input, config.read_options(), skip)
    winners = read["samples"] | "DuplicateKeys" >> DuplicateKeys(completed_tables(config.output) if skip else ())
    threads = worker_torch_threads(config.torch_threads, p.options)
    decoded = read["samples"] | "Decode" >> beam.ParDo(Decode(decode_options, threads)).with_outputs(REJECTS, main="ok")
    share, copies = config.share_models(), config.model_copies
    own_servers = share and config.model_server == "process"
    segmented, seg_failed = decoded.ok | "Segment" >> RunInference(
        SegmenterModelHandler(segmenter_spec(config, segmenter), share, copies, threads, own_servers)
    ).with_exception_handling()
    # A failed batch runs again one sample at a time (pipeline/batch_failures.py): what fails alone is rejected
    # here with its own error; a batch of one that fails goes to RunInference's dead letter (the *Failures steps).
    segmented_alone = segmented | "SegmentFailedAlone" >> beam.ParDo(
        SplitFailures("segment", "segmenter_error")).with_outputs(REJECTS, main="ok")
    selected = segmented_alone.ok | "Select" >> beam.ParDo(Select(select_options)).with_outputs(REJECTS, main="ok")
    embedded, embed_failed = selected.ok | "Embed" >> RunInference(
        ClipEmbedder(clip_spec(config), share, copies, threads, own_servers)
    ).with_exception_handling()
    embedded_alone = embedded | "EmbedFailedAlone" >> beam.ParDo(
        SplitFailures("embed", "embedder_error")).with_outputs(REJECTS, main="ok")
    rows = embedded_alone.ok | "ToRows" >> beam.Map(_keyed_row, config.image_format, config.jpeg_quality)
    rejects = (
        read[REJECTS],
        decoded[REJECTS],
        seg_failed.failed_inferences
        | "SegmentFailures" >> beam.FlatMap(rejects_from_failed_batch, "segment", "segmenter_error"),
        segmented_alone[REJECTS],
        selected[REJECTS],
        embed_failed.failed_inferences
        | "EmbedFailures" >> beam.FlatMap(rejects_from_failed_batch, "embed", "embedder_error"),
        embedded_alone[REJECTS],
    ) | "AllRejects" >> beam.Flatten()
    keyed_rejects = rejects | "RejectsByUnit" >> beam.Map(_keyed_reject)
    markers = {"rows": rows, "rejects": keyed_rejects, "read": read[COUNTS]} | "Write" >> WriteUnits(
        config.output, schema, int(config.target_shard_mb * 2**20), config.rows_per_group, winners
    )
    if not manifest:
        return
    _ = (
        p
        | "ManifestTrigger" >> beam.Create([None])
        | "WriteManifest" >> beam.Map(
            write_manifest,
            output=config.output,
            config=config.to_dict(),
            lineage=lineage(config, segmenter),
            started_at=started_at,
            this_run=beam.pvalue.AsList(markers),  # also orders the manifest after every unit
            earlier_jobs=earlier_jobs,
        )
    )


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict | None:
    """Parse flags, build and run the job; returns the manifest when the run finished here, else None."""
    config, beam_args = parse_args(argv)
    return execute(config, beam_args, test_pipeline)[1]


def prepare_output(config: BuildConfig, fmt: str) -> frozenset[str]:
    """Check --output against --overwrite / --resume; returns the input units already complete (resume). `fmt`: the
    input's format, as ``check_input`` found it."""
    config_path = FileSystems.join(config.output, BUILD_CONFIG)
    check_output_is_apart(config, fmt)
    if existing_build(config.output):
        if config.overwrite:
            clear_output(config.output)
        elif not config.resume:
            raise FileExistsError(
                f"--output {config.output!r} already holds a build; "
                "pass --resume to finish it or --overwrite to replace it"
            )
        else:
            if not FileSystems.exists(config_path):
                raise ValueError(f"--resume: {config_path} is missing, so the settings of the interrupted build are "
                                 "unknown; resume needs the build's own folder (or pass --overwrite)")
            previous = read_json(config_path)
            for key in ("output", *RESUME_MAY_CHANGE):  # recorded by older builds; not compared (see BuildConfig)
                previous.pop(key, None)
            check_same_input(previous.get("input"), config.input)
            now = config.output_defining()
            if previous != now:
                changed = [f"{k} (build: {previous.get(k)!r}, now: {now.get(k)!r})"
                           for k in sorted({**previous, **now}) if previous.get(k) != now.get(k)]
                raise ValueError(f"--resume: settings that define the rows or the shards differ from the build's "
                                 f"({config_path}): {'; '.join(changed)}")
            check_completed_files(config.output)
            markers = read_markers(config.output)
            check_inputs_unchanged(markers)
            done = frozenset(m["source"] for m in markers)
            logger.info("resume: %d input unit(s) already complete", len(done))
            warn_unmatched_units(config, done, fmt)
            leftovers = unreferenced_files(config.output)
            named = ", ".join(leftovers[:3]) + (" ..." if len(leftovers) > 3 else "")
            if leftovers and "://" in config.output:  # a job outlives its killed launcher, and its lease with it
                logger.warning("resume: %d file(s) no completed unit lists (a unit killed while writing, or one that "
                               "a runner's job still writes, whose launcher was killed) are left as they are: %s; "
                               "units redone rewrite theirs", len(leftovers), named)
            elif leftovers:  # a unit killed while writing: redone from scratch, or gone from --input
                logger.info("resume: removing %d file(s) that no completed unit lists: %s", len(leftovers), named)
                delete_files(leftovers)
            return done
    elif config.resume:
        logger.warning("--resume: --output %s holds no build to resume; starting a new build there", config.output)
    write_atomic(config_path, json.dumps(config.output_defining(), sort_keys=True).encode())
    return frozenset()


def check_same_input(recorded: str | None, given: str) -> None:
    """ValueError when --input is spelled otherwise than in the build being resumed. Units are named by the paths
    the pattern spells (a relative pattern gives relative paths), so another spelling of the same files would redo
    every unit under new names; the message says which spelling to use, and whether it matches the same files here."""
    if recorded is None or recorded == given:
        return
    same = sorted(map(_real, match_files(recorded))) == sorted(map(_real, match_files(given)))
    hint = ("it matches the same files from here: pass it as recorded" if same else
            "from this directory it matches other files: run from the directory the build ran in, with that --input")
    raise ValueError(f"--resume: --input {given!r} differs from the build's --input {recorded!r}; {hint} (units are "
                     "named by the paths a pattern spells)")


def _real(path: str) -> str:
    """A local path made absolute with symlinks resolved; other URLs as they are."""
    return os.path.realpath(path) if "://" not in path else path


def check_output_is_apart(config: BuildConfig, fmt: str) -> None:
    """ValueError when --output's shards/, rejects/ or _units/ hold files no build wrote (a build would mix its
    shards with them; --overwrite would leave them), or when --input matches files there (--overwrite would delete
    the input, and a build would read its own output)."""
    foreign = foreign_files(config.output)
    if foreign:
        raise ValueError(f"--output {config.output!r} holds files no spatext build wrote, e.g. {foreign[0]} ("
                         f"{len(foreign)} in shards/, rejects/ or {UNITS_DIR}/): a build there would mix its shards "
                         "with them, and --overwrite deletes only a build's own files; choose another --output")
    if fmt not in ("webdataset", "parquet"):
        return
    tables = [_real(FileSystems.join(config.output, table)).rstrip("/") + "/" for table in OWN_FILES]
    inside = [path for path in match_files(config.input) if _real(path).startswith(tuple(tables))]
    if inside:
        raise ValueError(f"--input {config.input!r} matches files inside --output {config.output!r} ({inside[0]}): "
                         "a build would read its own output, and --overwrite would delete its input; choose another "
                         "--output")


def check_inputs_unchanged(markers: list[dict]) -> None:
    """ValueError when the input file of a completed unit has another size than when the unit was built: its rows
    came from the old content (for captions.jsonl and COCO json, every later line range shifted, so samples would be
    skipped or read twice); a changed modification time alone is a warning (a copy changes it too)."""
    changed, touched, now = [], [], {}
    for marker in markers:
        if "input_size" not in marker:  # built before markers recorded it
            continue
        path = input_file(marker["source"])
        if path not in now:
            now[path] = input_stamp(marker["source"])
        stamp = now[path]
        if not stamp:  # gone: warn_unmatched_units says so
            continue
        if stamp["input_size"] != marker["input_size"]:
            changed.append(f"{path} ({marker['input_size']} -> {stamp['input_size']} bytes)")
        elif marker.get("input_mtime") and stamp.get("input_mtime") and stamp["input_mtime"] != marker["input_mtime"]:
            touched.append(path)
    if changed:
        changed = sorted(set(changed))
        raise ValueError(f"--resume: {len(changed)} input file(s) changed since their units were built, e.g. "
                         f"{changed[0]}: their rows came from the old content; --overwrite to rebuild, or delete "
                         f"those units' markers in {UNITS_DIR}/ to redo them (tars and Parquet files only: a line "
                         "range of a changed captions.jsonl or COCO json no longer holds the same samples)")
    if touched:
        touched = sorted(set(touched))
        logger.warning("--resume: %d input file(s) of completed units were modified since (same size), e.g. %s: "
                       "their rows are from the content read then", len(touched), touched[0])


def warn_unmatched_units(config: BuildConfig, done: frozenset[str], fmt: str) -> None:
    """Warn when completed units are no longer matched by --input (tar and parquet inputs, one unit per file): their
    rows stay in the build, which then no longer reflects the input set."""
    if fmt not in ("webdataset", "parquet"):
        return
    gone = sorted(done - set(match_files(config.input)))
    if gone:
        logger.warning("--resume: %d completed unit(s) are no longer matched by --input %s, and their rows stay in the "
                       "build: %s%s", len(gone), config.input, ", ".join(gone[:3]),
                       f" and {len(gone) - 3} more" if len(gone) > 3 else "")


def check_completed_files(output: str) -> None:
    """FileNotFoundError naming the first file a completion marker lists that is gone: a resume would otherwise
    trust a unit whose shards are lost (and fail mid-job reading its keys)."""
    present = {table: {posixpath.basename(p) for p in list_files(output, table, "")}
               for table in (SHARDS_DIR, REJECTS_DIR)}
    missing = [path for _, table, path in completed_tables(output)  # one listing per table, not a call per file
               if posixpath.basename(path) not in present[table]]
    if missing:
        raise FileNotFoundError(
            f"--resume: {len(missing)} file(s) listed by completed units in {FileSystems.join(output, UNITS_DIR)} "
            f"are missing, e.g. {missing[0]}; delete those units' markers there to redo them, or --overwrite")


def check_units_per_run(config: BuildConfig, fmt: str) -> None:
    """ValueError when --units-per-run is set for an input that has no units per file (a folder or COCO corpus)."""
    if config.units_per_run and fmt not in ("webdataset", "parquet"):
        raise ValueError(f"--units-per-run applies to tar and parquet inputs (one unit per file); --input is {fmt}")


def job_skips(config: BuildConfig, done: frozenset[str], fmt: str | None = None) -> list[frozenset[str]]:
    """The units each Beam job leaves out: one job for everything (`done` only), or with --units-per-run N, jobs of
    N pending units each, in name order (units named first run first, so a key kept from a completed unit is also
    the one an uninterrupted build keeps: the first by name)."""
    if config.units_per_run == 0:
        return [done]
    fmt = fmt or check_input(config.input, config.read_options())  # the launcher passes what it found already
    check_units_per_run(config, fmt)
    units = sorted(match_files(config.input))
    pending = [unit for unit in units if unit not in done]
    if not pending:
        return [done]
    everything = frozenset(units)
    return [everything - frozenset(pending[i : i + config.units_per_run])
            for i in range(0, len(pending), config.units_per_run)]


def runs_here(options: PipelineOptions) -> bool:
    """Whether the job runs on this machine (DirectRunner), not on a remote runner's workers."""
    return options.view_as(StandardOptions).runner in (None, "DirectRunner", "direct")


def check_detectron2() -> None:
    """ValueError with the install hint when --segmenter detectron2 would run here and detectron2 is missing."""
    from spatext.pipeline.segmenters.detectron2_backend import import_detectron2  # lazy: optional backend

    try:
        import_detectron2()
    except ImportError as exc:
        raise ValueError(str(exc)) from exc  # the hint names the flag


def warn_if_device_would_idle(config: BuildConfig, options: PipelineOptions) -> bool:
    """Warn (and return True) when a GPU build runs on DirectRunner in one worker: the device then idles while that
    worker decodes, selects, crops and encodes (an emulated device was busy 0.53 of the time in-process, 0.64-0.90
    with 3 worker processes, 0.82-0.86 with 4 worker threads: benchmarks/pipeline_overlap.py)."""
    workers = options.view_as(DirectOptions).direct_num_workers
    if not (config.device.startswith("cuda") and runs_here(options) and workers in (None, 1)):
        return False
    logger.warning("--device %s on DirectRunner with one worker: the GPU idles while it does the CPU work; add "
                   "--direct_num_workers=N --direct_running_mode=multi_processing (or multi_threading; N about the "
                   "CPU cores) to keep it busy", config.device)
    return True


def _metrics_query(result: PipelineResult) -> dict:
    """Beam's metrics query of a finished job, {} where the runner reports none."""
    try:
        return result.metrics().query()
    except (NotImplementedError, AttributeError):  # a runner without metrics support
        return {}


def _settled(metric: object) -> object:
    """A metric's committed value, or its attempted one where the runner commits none."""
    committed = getattr(metric, "committed", None)
    return committed if committed is not None else getattr(metric, "attempted", None)


def model_calls(result: PipelineResult) -> dict[str, dict[str, float]]:
    """Per model step (``segment``, ``embed``): ``samples`` (inferences), ``calls`` and ``seconds`` (the summed
    latency of its ``run_inference`` calls as each worker saw it, so time spent waiting for a shared model counts)
    from RunInference's own metrics; {} where the runner reports no metrics."""
    stats: dict[str, dict[str, float]] = {}
    query = _metrics_query(result)
    for counter in query.get("counters", ()):
        if counter.key.metric.name == "num_inferences" and _settled(counter) is not None:
            stage = stats.setdefault(counter.key.step.split("/")[0].lower(), {"samples": 0, "calls": 0, "seconds": 0})
            stage["samples"] += _settled(counter)
    for dist in query.get("distributions", ()):
        value = _settled(dist)
        if dist.key.metric.name == "inference_batch_latency_micro_secs" and value is not None:
            stage = stats.setdefault(dist.key.step.split("/")[0].lower(), {"samples": 0, "calls": 0, "seconds": 0})
            stage["calls"] += value.count
            stage["seconds"] += value.sum / 1e6
    return stats


def mean_batch_sizes(result: PipelineResult) -> dict[str, float]:
    """Samples per ``run_inference`` call of the Segment and Embed steps (``model_calls``); {} where the runner
    reports no metrics. A batch that failed and ran again one sample at a time (``retried_batches``) still counts as
    one call here."""
    return {name: stage["samples"] / stage["calls"] for name, stage in model_calls(result).items()
            if stage["calls"]}


def retried_batches(result: PipelineResult) -> int:
    """Model batches that failed and ran again one sample at a time (``batch_failures``), over both model stages."""
    return sum(_settled(c) or 0 for c in _metrics_query(result).get("counters", ())
               if c.key.metric.name.endswith("_batches_run_one_by_one"))


def execute(
    config: BuildConfig, beam_args: list[str], test_pipeline: beam.Pipeline | None = None
) -> tuple[PipelineResult, dict | None]:
    """Run the job for `config`; returns Beam's result (metrics) and the manifest (None if not finished here)."""
    logger.info("build config: %s", json.dumps(config.to_dict(), sort_keys=True))
    # on the launcher, before --output is touched: bad settings fail fast (exit status 2), leaving nothing behind
    fmt = check_input(config.input, config.read_options())
    check_units_per_run(config, fmt)
    check_pretrained(clip_spec(config))
    if resolve_segmenter(config) == "mask2former":
        from spatext.pipeline.segmenters.mask2former import check_weights  # lazy: transformers' Mask2Former

        check_weights(config.segmenter_weights)
    if not any(a == "--runner" or a.startswith("--runner=") for a in beam_args):
        beam_args = ["--runner=DirectRunner", *beam_args]  # Beam's default (Prism) downloads a binary at start
    options = PipelineOptions(beam_args)
    if runs_here(options):  # a remote runner's workers have their own devices (a Dataflow launcher has no GPU)
        check_device(config.device)
        if config.segmenter == "detectron2":  # and their own packages (a worker container may hold it)
            check_detectron2()
    with folder_lock(config.output, "--output"):
        skip = prepare_output(config, fmt)
        jobs = job_skips(config, skip, fmt)
        if test_pipeline is not None and len(jobs) > 1:
            raise ValueError("a test pipeline runs one job: drop --units-per-run")
        started_at = time.time()
        warn_if_device_would_idle(config, options)
        done_before = len(read_markers(config.output))
        with torch_threads_restored():  # in-process runners set --torch-threads in this process: not beyond the build
            result = _run_jobs(config, options, jobs, test_pipeline, started_at, done_before)
    try:
        return result, read_manifest(config.output)
    except OSError:
        return result, None  # a remote runner that returned before the job finished


@contextlib.contextmanager
def torch_threads_restored() -> Iterator[None]:
    """Restore this process's torch intra-op threads on exit: always set, since a worker thread's setting changes what
    threads started later get while this thread still reads its own."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run_jobs(
    config: BuildConfig, options: PipelineOptions, jobs: list[frozenset[str]], test_pipeline: beam.Pipeline | None,
    started_at: float, done_before: int,
) -> PipelineResult:
    """Run the build's Beam job(s) in turn; the last job's result."""
    for number, job_skip in enumerate(jobs, 1):
        if len(jobs) > 1:
            logger.info("--units-per-run: job %d of %d", number, len(jobs))
        p = test_pipeline or beam.Pipeline(options=options)
        earlier = len(read_markers(config.output)) - done_before if number == len(jobs) > 1 else 0
        build_pipeline(p, config, started_at, job_skip, manifest=number == len(jobs), earlier_jobs=earlier)
        try:
            result = p.run()
            state = result.wait_until_finish()
        finally:  # an in-process runner's model servers (--model-server process) are this process's: not beyond it
            stop_started_servers()
        logger.info("pipeline finished: %s", state)
        sizes = mean_batch_sizes(result)
        if sizes:
            calls = model_calls(result)
            logger.info("samples per model call: %s (--segmenter-batch-size %d, --clip-batch-size %d); seconds in "
                        "model calls, summed over workers: %s",
                        ", ".join(f"{name} {size:.1f}" for name, size in sorted(sizes.items())),
                        config.segmenter_batch_size, config.clip_batch_size,
                        ", ".join(f"{name} {calls[name]['seconds']:.1f}" for name in sorted(sizes)))
        retried = retried_batches(result)
        if retried:
            logger.warning("%d model batch(es) failed and ran again one sample at a time: the samples that failed "
                           "alone are rejects with their own error (segment/segmenter_error, embed/embedder_error)",
                           retried)
    return result


def main(argv: list[str] | None = None) -> int:
    """Console entry: run the build and print a one-line summary."""
    # force: importing Beam has already configured the root logger, which would make a plain basicConfig a no-op
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    # Beam's batch-size estimator fits a line to a handful of timings and numpy warns on every fit: noise, not news
    warnings.filterwarnings("ignore", message="Polyfit may be poorly conditioned")
    try:
        manifest = run(argv)
    except (KeyboardInterrupt, RuntimeError) as exc:  # Beam re-raises Ctrl-C in a transform as a RuntimeError
        if isinstance(exc, RuntimeError) and not str(exc).startswith("KeyboardInterrupt"):
            raise
        print("spatext build: interrupted; the units completed so far are kept: run the same command with --resume "
              "to finish", file=sys.stderr)
        return 130
    if manifest is not None:
        counts = manifest["counts"]
        print(
            f"read {counts['read']}, accepted {counts['accepted']}, rejected {counts['rejected']} "
            f"{counts['rejected_by_reason']} in {manifest['wall_time_s']:.1f} s"
        )
        if counts["read"] and not counts["accepted"]:
            print(f"no sample was accepted: every input was rejected; see {manifest['config']['output']}/rejects/")
    return 0


if __name__ == "__main__":  # `python -m spatext.pipeline.build` answers bad input as `spatext build` does
    from spatext.cli import main as spatext_main

    raise SystemExit(spatext_main(["build", *sys.argv[1:]]))
