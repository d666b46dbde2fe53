"""The `spatext` command: one entry point that dispatches to each package's subcommand."""

from __future__ import annotations

import importlib
import logging
import os
import sys

DEBUG_ENV = "SPATEXT_DEBUG"  # set: errors propagate with their traceback

# subcommand -> (module with a `main(argv) -> int`, one-line help)
COMMANDS = {
    "demo-corpus": ("spatext.pipeline.demo_corpus", "write the built-in procedural sample corpus"),
    "build": ("spatext.pipeline.build", "build Parquet shards from a corpus (Apache Beam job)"),
    "verify": ("spatext.pipeline.verify", "check a build's shards against the schema and invariants"),
    "inspect": ("spatext.pipeline.inspect_shards", "draw samples of a build with their segments"),
    "train": ("spatext.model.train", "train a SpaText denoiser (or, with a prior config, the prior P) on shards"),
    "sample": ("spatext.model.sample", "generate images from a trained run: global prompt + scene"),
    "train-prior": ("spatext.model.prior_train", "train the prior P (CLIP text -> image embedding) on shards"),
    "tiny-base-model": ("spatext.model.tiny_base", "write a tiny offline SD-like base model (random weights)"),
    "eval": ("spatext.eval.cli", "evaluation: make-benchmark, generate (methods + baselines), score (reports)"),
    "demo": ("spatext.demo", "run the offline end-to-end demo"),
}


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def command_logging(level: int = logging.INFO) -> None:
    """Log records of `level` and up to stderr, for a command's main: a handler when the root logger has none, and
    the root level lowered to `level`. Importing Beam logs a warning through the root logger, which gives it a
    handler at the default WARNING level; a plain ``basicConfig(level=INFO)`` after that does nothing, and a
    command's INFO lines (e.g. the prior's held-out cosine) vanished."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT)
    if root.level == logging.NOTSET or root.level > level:
        root.setLevel(level)


def usage() -> str:
    """The top-level help text."""
    lines = ["usage: spatext COMMAND [options]   (spatext COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `spatext COMMAND ...` to the command's module."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"spatext: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    # Beam warns at import that its GCP clients are missing; they are optional (apache-beam[gcp], for Dataflow).
    logging.getLogger().addFilter(lambda record: "apitools not found" not in record.getMessage())
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.main(rest) or 0)
    except (ValueError, OSError) as exc:  # bad input or a missing file: the message is the answer, not a traceback
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"spatext {command}: error: {exc}\n(set {DEBUG_ENV}=1 to see the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spatext {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
