"""`spatext eval SUBCOMMAND ...`: the evaluation commands (benchmark sets, generation, scoring).

    spatext eval make-benchmark --shards build/ --protocol few --num 500 --seed 0 --out bench/coco-few

Each subcommand is one entry of ``SUBCOMMANDS``: a name, a help line, a function that adds its flags to its parser
and a function ``run(args) -> int``. Add a subcommand by appending an entry; ``main`` needs no change.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from spatext.cli import DEBUG_ENV, command_logging
from spatext.eval.errors import ModelLoadError
from spatext.eval.masks import PERTURB_FLAG, PERTURB_FORMS, MaskPerturbation, parse_perturb

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subcommand:
    """One `spatext eval` subcommand."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def perturb_type(value: str) -> MaskPerturbation:
    """argparse ``type=`` for ``--mask-perturb`` (the error names the flag and the valid forms)."""
    try:
        return parse_perturb(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_mask_perturb_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--mask-perturb`` (mask sensitivity) to a subcommand's parser."""
    parser.add_argument(
        PERTURB_FLAG, type=perturb_type, default=None, metavar="KIND:PX",
        help=f"perturb the input masks to measure mask sensitivity: {PERTURB_FORMS}",
    )


def _add_make_benchmark(parser: argparse.ArgumentParser) -> None:
    """Flags of `make-benchmark`."""
    from spatext.eval.benchmark_set import PROTOCOLS

    parser.add_argument("--shards", required=True, help="a build folder (with shards/) or a folder of shard files")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="filtered",
                        help="all: every labelled segment; filtered: segments >= 5%% of the image; "
                             "few: 1-3 such segments chosen by (seed, key)")
    parser.add_argument("--num", type=int, default=None, help="number of samples (default: every eligible sample)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample ranking and of the `few` choice")
    parser.add_argument("--out", required=True, help="output folder of the benchmark set")
    parser.add_argument("--overwrite", action="store_true", help="replace a benchmark set already in --out")


def _run_make_benchmark(args: argparse.Namespace) -> int:
    """Write a benchmark set and print one summary line."""
    from spatext.eval.benchmark_set import BenchmarkSpec, make_benchmark

    spec = BenchmarkSpec(shards=args.shards, out=args.out, protocol=args.protocol, num=args.num, seed=args.seed,
                         overwrite=args.overwrite)
    logger.info("make-benchmark: %s", spec)
    info = make_benchmark(spec)
    skipped = ", ".join(f"{k} {v}" for k, v in info["skipped"].items())
    print(f"benchmark {info['protocol']}: {info['num_samples']} samples, {info['num_regions']} regions "
          f"(eligible {info['eligible']}; skipped: {skipped}) -> {args.out}")
    return 0


def _add_generate(parser: argparse.ArgumentParser) -> None:
    """Flags of `generate`."""
    from spatext.eval.generate import add_arguments

    add_arguments(parser)
    add_mask_perturb_argument(parser)


def _run_generate(args: argparse.Namespace) -> int:
    """Generate one image per benchmark sample and print one summary line."""
    from spatext.eval.generate import generate, spec_from_args

    spec = spec_from_args(args)
    logger.info("generate: %s", spec)
    info = generate(spec)
    print(f"generate {info['method']}: {len(info['images'])} images -> {args.out}")
    return 0


def _add_score(parser: argparse.ArgumentParser) -> None:
    """Flags of `score`."""
    from spatext.eval.score import add_arguments

    add_arguments(parser)
    add_mask_perturb_argument(parser)


def _run_score(args: argparse.Namespace) -> int:
    """Score generations folders, write the report and print one summary line."""
    from spatext.eval.score import score, spec_from_args

    spec = spec_from_args(args)
    logger.info("score: %s", spec)
    result = score(spec)
    print(f"score: {len(result['methods'])} methods on {result['benchmark']['num_samples']} samples -> {args.out}")
    return 0


SUBCOMMANDS: list[Subcommand] = [
    Subcommand("make-benchmark", "make a benchmark set (prompts, masks, reference images) from shards",
               _add_make_benchmark, _run_make_benchmark),
    Subcommand("generate", "generate one image per benchmark sample with a method (spatext or a baseline)",
               _add_generate, _run_generate),
    Subcommand("score", "score generations against a benchmark and write a report (md, json, csv, PNG)",
               _add_score, _run_score),
]


def build_parser() -> argparse.ArgumentParser:
    """The `spatext eval` parser with one subparser per entry of SUBCOMMANDS."""
    parser = argparse.ArgumentParser(prog="spatext eval", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")
    commands = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for sub in SUBCOMMANDS:
        sub_parser = commands.add_parser(sub.name, help=sub.help, description=sub.help)
        sub.add_arguments(sub_parser)
        sub_parser.set_defaults(run=sub.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, run the subcommand; bad input becomes a one-line error and exit status 2.

    Bad input is a ValueError (flags, file contents), an OSError (files, folders, a segmenter's missing weights)
    or a ``ModelLoadError`` (weights a flag names cannot be loaded, e.g. offline). Other errors are bugs and keep
    their traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    # The shared helper: importing Beam has already given the root logger a handler, so a plain basicConfig would
    # do nothing. The flag is explicit, so the root level is set to it exactly (also when that raises it: ERROR).
    level = logging.getLevelName(args.log_level)
    command_logging(level)
    logging.getLogger().setLevel(level)
    try:
        return int(args.run(args) or 0)
    except (ValueError, OSError, ModelLoadError) as e:
        if os.environ.get(DEBUG_ENV):
            raise
        message = " ".join(str(e).split())  # one line, whatever the wrapped library's message looked like
        print(f"spatext eval {args.command}: error: {message}\n(set {DEBUG_ENV}=1 to see the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
