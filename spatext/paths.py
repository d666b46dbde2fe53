"""Paths that files name (a benchmark's samples.jsonl, a generations folder's generation.json, a scene's masks):
the one check that such a path stays inside the folder it is relative to, so a crafted file cannot read others."""

from __future__ import annotations

import os
import stat


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
