"""The build's one config object and its command-line flags (everything not listed here goes to Beam)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from dataclasses import dataclass

from apache_beam.options.pipeline_options import PipelineOptions

from spatext.pipeline.read import INPUT_FORMATS, ReadOptions
from spatext.pipeline.schema import IMAGE_FORMATS
from spatext.pipeline.segmenters import available_segmenters, check_segmenter_name
from spatext.pipeline.selection import SelectOptions

SEGMENTERS = ("auto", *available_segmenters())
DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:\d+)?")  # the torch devices the model wrappers run on
JPEG_QUALITY = (1, 100)  # Pillow's range (above 95 the files grow with no visible gain)
MIN_MAX_PIXELS = 16 * 16  # the smallest image decode accepts (decode.MIN_SIDE squared)
PRECISIONS = ("fp32", "bf16", "fp16")
MODEL_SHARING = ("auto", "process", "machine")
MODEL_SERVERS = ("thread", "process")  # where a shared model runs (model_stage.py)


@dataclass(frozen=True)
class BuildConfig:
    """Every setting of one build; logged at start and stored in the manifest."""

    input: str
    output: str
    input_format: str = "auto"
    image_column: str | None = None  # parquet; None = detect
    caption_column: str | None = None  # parquet; None = detect
    key_column: str | None = None  # parquet; None = detect, else '{file stem}/{row}'
    coco_split: str | None = None  # coco; None = the only annotations/panoptic_*.json
    image_size: int = 512
    image_format: str = "jpeg"
    jpeg_quality: int = 95
    max_pixels: int = 64_000_000
    segmenter: str = "auto"
    segmenter_weights: str | None = None
    segmenter_config: str | None = None
    segmenter_threshold: float = 0.8
    segmenter_mask_threshold: float = 0.5
    segmenter_overlap_threshold: float = 0.8
    segmenter_processor_size: int | None = None
    segmenter_batch_size: int = 4
    min_area: float = 0.05
    k_min: int = 1
    k_max: int = 3
    seed: int = 0
    clip_model: str = "ViT-L-14"
    clip_pretrained: str = "openai"
    clip_batch_size: int = 16
    device: str = "cpu"
    precision: str = "fp32"
    model_sharing: str = "auto"  # process | machine (one model server shared by a machine's worker processes)
    model_copies: int | None = None  # with machine sharing: model servers per machine
    model_server: str = "thread"  # with machine sharing: thread (Beam's large_model, in a worker) | process (its own)
    torch_threads: int = 0  # intra-op threads per worker process; 0 = auto (pipeline/torch_threads.py)
    rows_per_group: int = 256
    target_shard_mb: float = 128.0
    overwrite: bool = False
    resume: bool = False
    units_per_run: int = 0  # 0: every input unit in one Beam job; N: jobs of N units each, units written per job

    def __post_init__(self) -> None:
        _check_choice("--input-format", self.input_format, INPUT_FORMATS)
        _check_choice("--image-format", self.image_format, IMAGE_FORMATS)
        check_segmenter_name(self.segmenter)
        _check_choice("--precision", self.precision, PRECISIONS)
        if self.precision != "fp32" and not self.device.startswith("cuda"):
            raise ValueError(f"--precision {self.precision} applies on cuda only (--device {self.device} runs the "
                             "models in fp32): drop --precision or use --device cuda")
        _check_choice("--model-sharing", self.model_sharing, MODEL_SHARING)
        if self.torch_threads < 0:
            raise ValueError(f"--torch-threads must be >= 0 (0: auto), got {self.torch_threads}")
        if self.model_copies is not None and self.model_copies < 1:
            raise ValueError(f"--model-copies must be >= 1, got {self.model_copies}")
        if self.model_copies is not None and self.model_sharing == "process":
            raise ValueError("--model-copies needs --model-sharing machine (or auto): it counts model servers "
                             "per machine")
        _check_choice("--model-server", self.model_server, MODEL_SERVERS)
        if self.model_server != "thread" and not self.share_models():
            raise ValueError("--model-server process needs shared models (--model-sharing machine, or auto with "
                             "--device cuda or --model-copies): it says where a shared model runs")
        if not DEVICE.fullmatch(self.device):
            raise ValueError(f"--device must be cpu, cuda, cuda:N, mps or xpu; got {self.device!r}")
        if not JPEG_QUALITY[0] <= self.jpeg_quality <= JPEG_QUALITY[1]:
            raise ValueError(f"--jpeg-quality must be in {JPEG_QUALITY[0]}..{JPEG_QUALITY[1]}, got {self.jpeg_quality}")
        if self.max_pixels < MIN_MAX_PIXELS:
            raise ValueError(f"--max-pixels must be >= {MIN_MAX_PIXELS} (16 x 16, the smallest image accepted), "
                             f"got {self.max_pixels}")
        if self.image_size < 16:
            raise ValueError(f"--image-size must be >= 16, got {self.image_size}")
        SelectOptions(self.min_area, self.k_min, self.k_max, self.seed)  # --min-area / --k-min / --k-max, at launch
        if self.overwrite and self.resume:
            raise ValueError("--overwrite and --resume exclude each other")
        if self.target_shard_mb <= 0:
            raise ValueError(f"--target-shard-mb must be > 0, got {self.target_shard_mb}")
        if self.rows_per_group < 1:
            raise ValueError(f"--rows-per-group must be >= 1, got {self.rows_per_group}")
        for flag, value in (("--segmenter-threshold", self.segmenter_threshold),
                            ("--segmenter-mask-threshold", self.segmenter_mask_threshold),
                            ("--segmenter-overlap-threshold", self.segmenter_overlap_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{flag} must lie in [0, 1], got {value}")
        if self.segmenter_processor_size is not None and self.segmenter_processor_size < 1:
            raise ValueError(f"--segmenter-processor-size must be >= 1, got {self.segmenter_processor_size}")
        if min(self.segmenter_batch_size, self.clip_batch_size) < 1:
            raise ValueError("--segmenter-batch-size and --clip-batch-size must be >= 1")
        if self.units_per_run < 0:
            raise ValueError(f"--units-per-run must be >= 0 (0: one job for all units), got {self.units_per_run}")

    def to_dict(self) -> dict:
        """A JSON-ready copy."""
        return dataclasses.asdict(self)

    def share_models(self) -> bool:
        """Whether worker processes share model servers: asked for, or auto on a GPU (a copy per process would not fit
        many times into its memory, and one copy fed by every process keeps it busy)."""
        if self.model_sharing == "auto":
            return self.device.startswith("cuda") or self.model_copies is not None
        return self.model_sharing == "machine"

    def read_options(self) -> ReadOptions:
        """The read stage's part of the config."""
        return ReadOptions(self.input_format, self.image_column, self.caption_column, self.key_column, self.coco_split)

    def output_defining(self) -> dict:
        """The settings that determine the rows and the shard sizes `verify` checks: a resumed build must match them
        exactly (build_config.json records them). Those in RESUME_MAY_CHANGE may differ."""
        unset = {k for k in _READ_FLAGS if getattr(self, k) is None}  # kept out: builds made before these flags
        return {k: v for k, v in self.to_dict().items() if k not in RESUME_MAY_CHANGE and k not in unset}


# Settings a --resume may change: how the work runs, where the build is (a moved or copied build resumes too), and
# the rows per Parquet row group (readers take any; older builds recorded it and a resume ignores it there).
RESUME_MAY_CHANGE = ("overwrite", "resume", "device", "segmenter_batch_size", "clip_batch_size", "model_sharing",
                     "model_copies", "model_server", "units_per_run", "output", "rows_per_group", "torch_threads")
_READ_FLAGS = ("image_column", "caption_column", "key_column", "coco_split")


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{flag} must be one of {', '.join(choices)}; got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    """The `spatext build` flags; unknown flags are Beam pipeline options (--runner, --direct_num_workers, ...)."""
    p = argparse.ArgumentParser(
        prog="spatext build",
        description="Build spatio-textual Parquet shards from an image-text corpus. Flags not listed here are "
        "passed to Apache Beam (e.g. --runner DataflowRunner --project P --region R --setup_file ./setup.py).",
    )
    d = BuildConfig("", "")
    p.add_argument("--input", required=True, help="corpus: webdataset tar pattern (globs, {000..009} ranges), "
                   "parquet file pattern, a folder with captions.jsonl, or a COCO root (annotations/panoptic_*.json); "
                   "local or any Beam filesystem path (gs://, s3://)")
    p.add_argument("--output", required=True, help="output directory: shards/, rejects/, manifest.json")
    p.add_argument("--input-format", default=d.input_format, choices=INPUT_FORMATS,
                   help="corpus format; auto = detected from --input")
    p.add_argument("--image-column", default=None,
                   help="parquet: image column (bytes or {bytes, path} struct); default: first of jpg, image, img, "
                   "image_bytes, png, webp")
    p.add_argument("--caption-column", default=None,
                   help="parquet: caption column; default: first of caption, txt, text, prompt")
    p.add_argument("--key-column", default=None,
                   help="parquet: key column; default: key or id, else '{file stem}/{row index}'")
    p.add_argument("--coco-split", default=None,
                   help="coco: split to read (e.g. val2017); default: the only annotations/panoptic_{split}.json")
    p.add_argument("--image-size", type=int, default=d.image_size, help="longest side of stored images (px)")
    p.add_argument("--image-format", default=d.image_format, choices=IMAGE_FORMATS, help="stored image encoding")
    p.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality, help="JPEG quality of stored images")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help="reject images above this many pixels")
    p.add_argument("--segmenter", default=d.segmenter, metavar="{" + ",".join(SEGMENTERS) + "} or MODULE:CALLABLE",
                   help="segmentation backend; auto = the corpus's ground truth when it has some, else mask2former; "
                   "MODULE:CALLABLE = your own (a callable taking a SegmenterSpec, returning a Segmenter)")
    p.add_argument("--segmenter-weights", default=None,
                   help="mask2former: hub name or local directory (default facebook/mask2former-swin-large-coco-"
                   "panoptic); detectron2: checkpoint path or URL (default: the model zoo's for --segmenter-config); "
                   "'none' = random init (testing only, labelled)")
    p.add_argument("--segmenter-config", default=None,
                   help="mask2former: JSON architecture for random init (e.g. mask2former-tiny); detectron2: a model "
                   "zoo config (default COCO-PanopticSegmentation/panoptic_fpn_R_101_3x.yaml) or a local .yaml")
    p.add_argument("--segmenter-threshold", type=float, default=d.segmenter_threshold, help="panoptic score threshold")
    p.add_argument("--segmenter-mask-threshold", type=float, default=d.segmenter_mask_threshold,
                   help="mask probability threshold of the panoptic post-processing")
    p.add_argument("--segmenter-overlap-threshold", type=float, default=d.segmenter_overlap_threshold,
                   help="min kept fraction of a mask after overlaps are resolved")
    p.add_argument("--segmenter-processor-size", type=int, default=None,
                   help="shortest edge the segmenter's processor resizes to (default: the processor's own)")
    p.add_argument("--segmenter-batch-size", type=int, default=d.segmenter_batch_size, help="images per batch")
    p.add_argument("--min-area", type=float, default=d.min_area, help="min segment area (fraction of the image)")
    p.add_argument("--k-min", type=int, default=d.k_min, help="min segments per sample")
    p.add_argument("--k-max", type=int, default=d.k_max, help="max segments per sample")
    p.add_argument("--seed", type=int, default=d.seed, help="selection seed (selection is a function of seed, key)")
    p.add_argument("--clip-model", default=d.clip_model, help="open_clip model name (e.g. ViT-L-14, ViT-B-32)")
    p.add_argument("--clip-pretrained", default=d.clip_pretrained,
                   help="open_clip pretrained tag, local checkpoint file, or 'none' = random init (testing only)")
    p.add_argument("--clip-batch-size", type=int, default=d.clip_batch_size, help="samples per CLIP batch")
    p.add_argument("--device", default=d.device, help="torch device for the models: cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="model forwards in fp32, or in bf16 / fp16 with --device cuda only (CLIP: half-precision "
                        "weights; the segmenter: autocast)")
    p.add_argument("--model-sharing", default=d.model_sharing, choices=MODEL_SHARING,
                   help="process = each worker process loads its own models; machine = one model server per "
                   "machine that all its worker processes send batches to (Beam's large_model: decode overlaps "
                   "the GPU, one copy in GPU memory); auto = machine when --device is cuda, else process")
    p.add_argument("--model-copies", type=int, default=None,
                   help="model servers per machine with machine sharing (e.g. one per GPU); default 1")
    p.add_argument("--model-server", default=d.model_server, choices=MODEL_SERVERS,
                   help="where a shared model runs: thread = Beam's large_model, a thread of the worker process that "
                   "loaded it first (its launches wait for the GIL behind that worker's own work); process = a "
                   "server process of its own (Beam's MultiProcessShared with spawn_process; start-up costs a few "
                   "seconds)")
    p.add_argument("--torch-threads", type=int, default=d.torch_threads,
                   help="torch intra-op threads in each worker process; 0 = auto: 1 where Beam runs samples in "
                   "parallel (several DirectRunner workers, Dataflow, Spark, Flink), so that processes and threads "
                   "do not each start one per core; torch's default in a single DirectRunner worker and in a shared "
                   "model server")
    p.add_argument("--rows-per-group", type=int, default=d.rows_per_group, help="Parquet row group size (rows)")
    p.add_argument("--target-shard-mb", type=float, default=d.target_shard_mb,
                   help="max size of an output shard (MB); each input unit (tar) writes one or more shards")
    p.add_argument("--overwrite", action="store_true", help="delete an existing build in --output first")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted build in --output: skip input units already completed")
    p.add_argument("--units-per-run", type=int, default=d.units_per_run,
                   help="tar/parquet inputs: run the job N input units at a time (one Beam job each, in name order), "
                   "so units are written and a kill loses at most one job's work; 0 = one job for everything "
                   "(a Beam batch job writes no unit before every unit has been read and embedded)")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[BuildConfig, list[str]]:
    """Split argv into the build's config and the Beam pipeline arguments; ValueError for an argument that is
    neither (Beam itself only logs 'Discarding unparseable args' and goes on without it)."""
    args, beam_args = build_parser().parse_known_args(argv)
    check_beam_args(beam_args)
    return BuildConfig(**vars(args)), beam_args


def check_beam_args(beam_args: list[str]) -> None:
    """ValueError naming arguments that are no Beam pipeline option: a misspelt flag (``--rows-per-groups``) or a
    stray word, typically an unquoted glob the shell expanded (``--input c/*.tar`` -> ``--input c/1.tar c/2.tar``:
    the build would read only the first file)."""
    options = PipelineOptions(beam_args)
    beam_logger = logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_logger.level
    beam_logger.setLevel(logging.ERROR)  # its 'Discarding unparseable args' warning: the error below says it better
    try:
        known = options.get_all_options(drop_default=True)
    finally:
        beam_logger.setLevel(level)
    unknown = set(options.get_all_options(retain_unknown_options=True, drop_default=True)) - set(known)
    if unknown:
        typed = {token[2:].split("=", 1)[0].replace("-", "_"): token.split("=", 1)[0]
                 for token in beam_args if token.startswith("--")}  # the flags as the user spelt them
        names = sorted(typed.get(name, "--" + name) for name in unknown)
        raise ValueError(f"unknown flag(s) {', '.join(names)}: neither a build flag nor a Beam pipeline option "
                         "(spatext build --help lists the build's)")
    strays, i = [], 0
    while i < len(beam_args):
        token = beam_args[i]
        if not token.startswith("-"):
            strays.append(token)
            i += 1
            continue
        name = token.lstrip("-").split("=", 1)[0].replace("-", "_")
        takes_value = "=" not in token and not isinstance(known.get(name), bool)
        i += 2 if takes_value and i + 1 < len(beam_args) and not beam_args[i + 1].startswith("-") else 1
    if strays:
        raise ValueError(f"unexpected argument(s) {' '.join(strays[:3])}{' ...' if len(strays) > 3 else ''}: quote "
                         "glob patterns (--input 'data/*.tar') so that the shell does not expand them")
