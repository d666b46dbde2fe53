"""The main job: corpus -> decode -> segment -> select -> CLIP-embed -> Parquet shards (+ rejects, manifest).

Run it as `spatext build ...` or, the usual Beam way, `python -m spatext.pipeline.build ...`. Flags the build does
not know are Beam pipeline options (--runner, --direct_running_mode, --project, --setup_file, ...).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from importlib import metadata

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult

from spatext.pipeline.clip import ClipEmbedder, ClipSpec, clip_embed_dim
from spatext.pipeline.config import BuildConfig, parse_args
from spatext.pipeline.decode import Decode, DecodeOptions
from spatext.pipeline.read import REJECTS, ReadCorpus, has_annotations
from spatext.pipeline.records import rejects_from_failed_batch
from spatext.pipeline.schema import sample_to_row, shard_schema
from spatext.pipeline.segment import SegmenterModelHandler
from spatext.pipeline.segmenters.base import GROUND_TRUTH_LABEL, RANDOM_INIT_LABEL, SegmenterSpec
from spatext.pipeline.selection import Select, SelectOptions
from spatext.pipeline.write import (
    SHARDS_DIR,
    WriteRejects,
    WriteTable,
    clear_output,
    existing_build,
    read_manifest,
    reason_code,
    write_manifest,
)

logger = logging.getLogger(__name__)


def resolve_segmenter(config: BuildConfig) -> str:
    """The concrete segmenter: `auto` means the corpus's ground truth when it has some, else mask2former."""
    if config.segmenter != "auto":
        return config.segmenter
    return "annotations" if has_annotations(config.input, config.input_format) else "mask2former"


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
    )


def clip_spec(config: BuildConfig) -> ClipSpec:
    """The CLIP part of the config."""
    return ClipSpec(
        model=config.clip_model, pretrained=config.clip_pretrained, device=config.device,
        batch_size=config.clip_batch_size,
    )


def shard_metadata(config: BuildConfig, segmenter: str) -> dict[str, object]:
    """The key-value metadata every shard carries (DESIGN.md: what made these rows)."""
    if segmenter == "annotations":
        seg_weights = GROUND_TRUTH_LABEL
    else:
        seg_weights = RANDOM_INIT_LABEL if config.segmenter_weights == "none" else config.segmenter_weights
    return {
        "clip_model": config.clip_model,
        "clip_pretrained": RANDOM_INIT_LABEL if config.clip_pretrained == "none" else config.clip_pretrained,
        "embed_dim": clip_embed_dim(config.clip_model),
        "segmenter": segmenter,
        "segmenter_weights": seg_weights,
        "min_area": config.min_area,
        "k_min": config.k_min,
        "k_max": config.k_max,
        "seed": config.seed,
        "image_size": config.image_size,
        "image_format": config.image_format,
        "package_version": _version("spatext"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def lineage(config: BuildConfig, segmenter: str) -> dict:
    """Where the rows came from and what software made them."""
    packages = ("spatext", "apache-beam", "torch", "open_clip_torch", "transformers", "pyarrow")
    return {
        "input": config.input,
        "segmenter": segmenter,
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in packages},
    }


def _to_row(pair, image_format: str, jpeg_quality: int) -> dict:
    sample, embeddings = pair
    return sample_to_row(sample, embeddings, image_format, jpeg_quality)


def build_pipeline(p: beam.Pipeline, config: BuildConfig, started_at: float) -> None:
    """Add the build's labelled steps to pipeline `p`."""
    segmenter = resolve_segmenter(config)
    decode_options = DecodeOptions(config.image_size, config.max_pixels, require_annotation=segmenter == "annotations")
    select_options = SelectOptions(config.min_area, config.k_min, config.k_max, config.seed)
    schema = shard_schema(shard_metadata(config, segmenter))

    read = p | "Read" >> ReadCorpus(config.input, config.input_format)
    decoded = read["samples"] | "Decode" >> beam.ParDo(Decode(decode_options)).with_outputs(REJECTS, main="ok")
    segmented, seg_failed = decoded.ok | "Segment" >> RunInference(
        SegmenterModelHandler(segmenter_spec(config, segmenter))
    ).with_exception_handling()
    selected = segmented | "Select" >> beam.ParDo(Select(select_options)).with_outputs(REJECTS, main="ok")
    embedded, embed_failed = selected.ok | "Embed" >> RunInference(
        ClipEmbedder(clip_spec(config))
    ).with_exception_handling()
    rows = embedded | "ToRows" >> beam.Map(_to_row, config.image_format, config.jpeg_quality)
    files = rows | "WriteShards" >> WriteTable(
        config.output, SHARDS_DIR, schema, config.rows_per_group, config.num_shards
    )

    rejects = (
        read[REJECTS],
        decoded[REJECTS],
        seg_failed.failed_inferences
        | "SegmentFailures" >> beam.FlatMap(rejects_from_failed_batch, "segment", "segmenter_error"),
        selected[REJECTS],
        embed_failed.failed_inferences
        | "EmbedFailures" >> beam.FlatMap(rejects_from_failed_batch, "embed", "embedder_error"),
    ) | "AllRejects" >> beam.Flatten()
    reject_files = rejects | "WriteRejects" >> WriteRejects(config.output)

    n_read = (
        (read["samples"] | "CountRead" >> beam.combiners.Count.Globally()),
        (read[REJECTS] | "CountReadRejects" >> beam.combiners.Count.Globally()),
    ) | "ReadCounts" >> beam.Flatten() | "SumRead" >> beam.CombineGlobally(sum)
    n_accepted = rows | "CountAccepted" >> beam.combiners.Count.Globally()
    by_reason = rejects | "ReasonCodes" >> beam.Map(reason_code) | "CountReasons" >> beam.combiners.Count.PerElement()
    _ = (
        p
        | "ManifestTrigger" >> beam.Create([None])
        | "WriteManifest" >> beam.Map(
            write_manifest,
            output=config.output,
            config=config.to_dict(),
            lineage=lineage(config, segmenter),
            read=beam.pvalue.AsSingleton(n_read),
            accepted=beam.pvalue.AsSingleton(n_accepted),
            rejected=beam.pvalue.AsList(by_reason),
            files=beam.pvalue.AsList(files),
            started_at=started_at,
        )
    )
    _ = reject_files  # written for their side effect; the manifest counts the rejects themselves


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict | None:
    """Parse flags, build and run the job; returns the manifest when the run finished here, else None."""
    config, beam_args = parse_args(argv)
    return execute(config, beam_args, test_pipeline)[1]


def execute(
    config: BuildConfig, beam_args: list[str], test_pipeline: beam.Pipeline | None = None
) -> tuple[PipelineResult, dict | None]:
    """Run the job for `config`; returns Beam's result (metrics) and the manifest (None if not finished here)."""
    logger.info("build config: %s", json.dumps(config.to_dict(), sort_keys=True))
    if existing_build(config.output):
        if not config.overwrite:
            raise FileExistsError(f"--output {config.output!r} already holds a build; pass --overwrite to replace it")
        clear_output(config.output)
    started_at = time.time()
    if not any(a == "--runner" or a.startswith("--runner=") for a in beam_args):
        beam_args = ["--runner=DirectRunner", *beam_args]  # Beam's default (Prism) downloads a binary at start
    options = PipelineOptions(beam_args)
    p = test_pipeline or beam.Pipeline(options=options)
    build_pipeline(p, config, started_at)
    result = p.run()
    state = result.wait_until_finish()
    logger.info("pipeline finished: %s", state)
    try:
        return result, read_manifest(config.output)
    except OSError:
        return result, None  # a remote runner that returned before the job finished


def main(argv: list[str] | None = None) -> int:
    """Console entry: run the build and print a one-line summary."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    manifest = run(argv)
    if manifest is not None:
        counts = manifest["counts"]
        print(
            f"read {counts['read']}, accepted {counts['accepted']}, rejected {counts['rejected']} "
            f"{counts['rejected_by_reason']} in {manifest['wall_time_s']:.1f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
