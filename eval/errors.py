"""Error types of ``spatext.eval`` that ``spatext eval`` reports as one-line errors (besides ValueError, OSError)."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model that a flag names could not be loaded, e.g. its weights are not downloadable offline.

    A RuntimeError (what the loaders raise) of its own type, so that the CLI can turn exactly these into
    ``error: ...`` lines and exit status 2 without catching every RuntimeError, which would hide bugs.
    """
