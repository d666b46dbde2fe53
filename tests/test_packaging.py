"""The wheel that `--setup_file ./setup.py` gives Dataflow workers holds every module and data file of the tree (a
file left out fails only on the workers, after the job has started)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"spatext": "spatext", "pipeline": "spatext/pipeline", "model": "spatext/model", "eval": "spatext/eval"}


def test_the_wheel_holds_every_module_and_config(tmp_path):
    source = tmp_path / "src"  # a copy without build/: setuptools would reuse a stale build/lib
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".whl", "build", "*.egg-info", "demo_output", "bench_output", "runs", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("spatext-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"{target}/{path.relative_to(ROOT / folder).as_posix()}"
                for folder, target in FOLDERS.items()
                for pattern in ("**/*.py", "**/*.json") for path in (ROOT / folder).glob(pattern)
                if "__pycache__" not in path.parts}
    assert any(name.endswith("model/configs/pixel-demo.json") for name in expected)  # the walk found the configs
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing}"
    assert any(name.endswith("entry_points.txt") for name in names)
