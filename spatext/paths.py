"""Paths that files name (a benchmark's samples.jsonl, a generations folder's generation.json, a scene's masks):
the one check that such a path stays inside the folder it is relative to, so a crafted file cannot read others; and
listing files under a folder named by the user, whose name is taken literally, not as a glob."""

from __future__ import annotations

import os
import re
import stat
import warnings
from typing import Any


def within(path: str, folder: str) -> bool:
    """Whether `path` lies inside `folder` (not `folder` itself), both with symlinks resolved."""
    return os.path.realpath(path).startswith(os.path.realpath(folder).rstrip(os.sep) + os.sep)


def leaves(folder: str, relative: object) -> bool:
    """Whether `relative` is not a relative path that stays inside `folder`: absolute, climbing out with '..', or
    leading out through a symlink (resolved), or not a non-empty string."""
    if not isinstance(relative, str) or not relative:
        return True
    normal = os.path.normpath(relative)
    if os.path.isabs(relative) or normal == os.pardir or normal.startswith(os.pardir + os.sep):
        return True
    return not within(os.path.join(folder, relative), folder)


def inside(folder: str, relative: object, what: str) -> str:
    """`folder`/`relative` when `relative` is a relative path that stays inside `folder` (also after symlinks are
    resolved) and names a regular file; ValueError naming `what` otherwise (absolute, '..', a link out, a FIFO)."""
    if leaves(folder, relative):
        raise ValueError(f"{what}: {relative!r} is not a relative path inside {folder!r} (symlinks resolved)")
    path = os.path.join(folder, relative)
    real = os.path.realpath(path)
    if not os.path.exists(real):
        raise ValueError(f"{what}: {relative!r} does not exist in {folder!r}")
    if not stat.S_ISREG(os.stat(real).st_mode):
        raise ValueError(f"{what}: {relative!r} is not a regular file")
    return path


def escape_glob(path: str) -> str:
    """`path` with glob characters bracketed (``[*]``, ``[?]``, ``[[]``), so that a pattern built on it matches the
    literal name: a build in ``runs/b[1]`` is not the glob ``runs/b1``."""
    return re.sub(r"([*?[])", r"[\1]", path)


def match_in(folder: str, *parts: str, limit: int | None = None) -> list[Any]:
    """Beam ``FileSystems`` metadata (``.path``, ``.size_in_bytes``, ...) of the files ``folder/parts...`` matches,
    ``folder`` taken literally and the last of ``parts`` a glob (any filesystem Beam reads: local, gs://, s3://)."""
    from apache_beam.io.filesystems import FileSystems  # lazy: Beam is the pipeline's, not every caller's

    query = FileSystems.join(escape_glob(folder), *parts)
    with warnings.catch_warnings():  # Beam's glob-to-regex warns about the "[[]" of an escaped bracket
        warnings.filterwarnings("ignore", message="Possible nested set", category=FutureWarning)
        results = FileSystems.match([query], limits=None if limit is None else [limit])
    return [m for r in results for m in r.metadata_list]


def delete_files(paths: list[str]) -> None:
    """Delete files by their literal names: local ones with ``os.remove``, gs:// ones escaped (Beam's local and GCS
    ``delete`` glob each path, so 'b[1]/x' would name 'b1/x'), others as they are (S3 and the rest take names
    literally)."""
    from apache_beam.io.filesystems import FileSystems

    remote = []
    for path in paths:
        if "://" not in path or path.startswith("file://"):
            os.remove(path.removeprefix("file://"))
        else:
            remote.append(escape_glob(path) if path.startswith("gs://") else path)
    if remote:
        FileSystems.delete(remote)
