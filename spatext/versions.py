"""The one lookup of installed package versions, for the lineage every output records (build manifests and shard
metadata, run.json, benchmark.json, generation.json, FID descriptions)."""

from __future__ import annotations

from importlib import metadata


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def package_versions(names: tuple[str, ...] | list[str]) -> dict[str, str | None]:
    """``{name: version or None}`` for each distribution in ``names`` (None: not installed; JSON null)."""
    return {name: package_version(name) for name in names}
