"""What the eval commands' output folders share: their info files, their images, and safety checks for
``--overwrite`` (``generate``, ``make-benchmark``, ``score``).

``--overwrite`` removes what a command wrote before; these checks make sure that is all it removes: never a folder
that is or holds one of the command's inputs (the benchmark, the shards, the run, the base model), and only folders
whose entries this tool writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import numpy as np

from spatext.paths import within


def is_same_or_inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (symlinks resolved)."""
    return os.path.realpath(path) == os.path.realpath(folder) or within(path, folder)


def refuse_inputs(flag: str, out: str, inputs: Mapping[str, str | None], what: str = "replace") -> None:
    """ValueError when the output folder ``out`` (given by ``flag``) is or contains one of the named input paths.

    ``inputs`` maps an input's flag (e.g. ``--benchmark``) to its path (None: not given; URLs are skipped).
    """
    for name, path in inputs.items():
        if path and "://" not in path and os.path.exists(path) and is_same_or_inside(path, out):
            raise ValueError(f"{flag} {out!r} is or contains the {name} folder {path!r}; refusing to {what} it")


def only_files_with_suffix(folder: str, suffixes: Iterable[str]) -> bool:
    """Whether ``folder`` holds regular files with one of ``suffixes`` only (no subfolders, no other files)."""
    suffixes = tuple(suffixes)
    with os.scandir(folder) as entries:
        return all(e.is_file(follow_symlinks=False) and e.name.endswith(suffixes) for e in entries)


def a_few(names: Iterable[str], limit: int = 3) -> str:
    """Up to ``limit`` names, quoted and comma-separated, then how many more (for one-line errors)."""
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def read_info(folder: str, name: str, fmt: str, version: int, flag: str, what: str) -> dict:
    """The format-versioned JSON file ``name`` of ``folder``, a ``what`` given with ``flag`` (e.g. ``--benchmark``).

    ValueError naming the flag and the folder when the file is missing, is not a JSON object, or is not ``fmt`` at
    ``version`` (the message gives the format and version found)."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {folder!r} is not a complete {what}: {name} is missing")
    with open(path, encoding="utf-8") as handle:
        try:
            info = json.load(handle)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting beyond the parser
            raise ValueError(f"{flag} {folder!r}: {name} is not valid JSON ({type(e).__name__}: {e})") from e
    found = (info.get("format"), info.get("format_version")) if isinstance(info, dict) else (None, None)
    if found != (fmt, version):
        raise ValueError(f"{flag} {folder!r}: {path}: expected format {fmt} v{version}, got {found[0]} v{found[1]}")
    return info


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] (values outside are clipped) as uint8: ``round(clip(x, 0, 1) * 255)``."""
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
