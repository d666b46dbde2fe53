"""What the eval output folders share: the format-versioned info files and the float -> uint8 image conversion."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from spatext.eval.benchmark_set import read_benchmark_info
from spatext.eval.generate import read_generations
from spatext.eval.outputs import read_info, to_uint8


@pytest.mark.parametrize(
    "read, name, fmt, flag, what",
    [(read_benchmark_info, "benchmark.json", "spatext-benchmark", "--benchmark", "benchmark set"),
     (read_generations, "generation.json", "spatext-generations", "--generations", "generations folder")],
)
def test_info_files_share_one_message_naming_the_flag_and_the_version_found(
    read, name: str, fmt: str, flag: str, what: str, tmp_path: Path
) -> None:
    folder = str(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"{flag} {folder!r} is not a complete {what}: {name} is missing")):
        read(folder)
    (tmp_path / name).write_text(json.dumps({"format": fmt, "format_version": 2}))
    expected = f"{flag} {folder!r}: {tmp_path / name}: expected format {fmt} v1, got {fmt} v2"
    with pytest.raises(ValueError, match=re.escape(expected)):
        read(folder)
    with pytest.raises(ValueError, match=re.escape(f"--out {folder!r}: ")):  # the flag the caller names
        read(folder, "--out")
    (tmp_path / name).write_text("[1, 2]")  # JSON, but not an object
    with pytest.raises(ValueError, match=re.escape(f"expected format {fmt} v1, got None vNone")):
        read(folder)
    (tmp_path / name).write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(f"{flag} {folder!r}: {name} is not valid JSON")):
        read(folder)
    (tmp_path / name).write_text(json.dumps({"format": fmt, "format_version": 1, "x": 3}))
    assert read(folder)["x"] == 3
    assert read_info(folder, name, fmt, 1, flag, what) == {"format": fmt, "format_version": 1, "x": 3}


def test_to_uint8_rounds_and_clips_like_a_per_pixel_reference() -> None:
    values = np.random.default_rng(0).uniform(-0.5, 1.5, (5, 7, 3)).astype(np.float32)
    got = to_uint8(values)
    # independent reference: clamp, scale and round each value in Python
    want = [round(min(max(float(v), 0.0), 1.0) * 255) for v in values.ravel()]
    assert got.dtype == np.uint8 and got.shape == values.shape
    assert got.ravel().tolist() == want
    assert to_uint8(np.array([0.0, 0.2, 1.0, -1.0, 2.0])).tolist() == [0, 51, 255, 0, 255]
