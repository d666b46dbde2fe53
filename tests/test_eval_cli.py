"""`spatext eval` entry point: options shared by every subcommand."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from spatext.eval import cli


@pytest.mark.parametrize("flag, level", [("INFO", logging.INFO), ("error", logging.ERROR)])
def test_log_level_applies_after_a_library_configured_the_root_logger(
    flag: str, level: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--log-level sets the root level although a root handler exists (Beam's import-time warning installs one at
    WARNING, which made the former plain ``logging.basicConfig`` a no-op); with INFO, the command's INFO line shows."""
    stream = io.StringIO()
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [logging.StreamHandler(stream)])
    monkeypatch.setattr(root, "level", logging.WARNING)
    argv = ["--log-level", flag, "make-benchmark", "--shards", str(tmp_path), "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2  # no shards in --shards: fails after the command logged its spec
    assert root.level == level
    assert ("make-benchmark: BenchmarkSpec(" in stream.getvalue()) == (level <= logging.INFO)
