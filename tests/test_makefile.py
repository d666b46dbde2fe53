"""The Makefile's set-up checks the free disk before it creates .venv (a full disk used to fail midway through pip)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make_setup(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`make setup OVERRIDES` in a copy of the set-up's inputs that has no .venv yet."""
    for name in ("Makefile", "requirements.txt", "constraints.txt", "setup.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    return subprocess.run(["make", "setup", *overrides], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=60)


def test_setup_refuses_when_the_disk_is_too_full(tmp_path):
    free_gb = shutil.disk_usage(tmp_path).free // 2**30
    result = make_setup(tmp_path, f"SETUP_GB={free_gb + 1000}")
    assert result.returncode != 0
    assert f"a new .venv needs about {free_gb + 1000} GB of free disk, {free_gb} GB free here" in result.stderr
    assert not (tmp_path / ".venv").exists()  # refused before anything was created


def test_setup_goes_on_when_there_is_room(tmp_path):
    # PYTHON=false: the check passes, then creating the venv fails at once (nothing is installed)
    result = make_setup(tmp_path, "SETUP_GB=0", "PYTHON=false")
    assert "free disk" not in result.stderr
    assert "false -m venv .venv" in result.stdout


def test_the_suite_keeps_temp_files_in_its_session_folder(session_tmpdir) -> None:
    import tempfile

    assert tempfile.gettempdir() == session_tmpdir == os.environ["TMPDIR"]
    assert "pytest-" in session_tmpdir  # under pytest's temp root, which keeps only the last few sessions
