"""A smaller build input of the same kind: links to the first fraction of a demo corpus's tar files.

Benchmarks run a quarter-size and a full build and take the difference, so that start-up (model loading, worker
processes, pipeline construction) cancels out, as it does in a job over millions of images.
"""

from __future__ import annotations

import os


def corpus_subset(corpus: str, fraction: float) -> str:
    """A folder of symlinks to the first `fraction` of the corpus's tars (at least one); returns its glob pattern."""
    files = sorted(f for f in os.listdir(corpus) if f.endswith(".tar"))
    if not files:
        raise ValueError(f"no .tar files in {corpus}")
    folder = os.path.join(corpus, f"subset-{fraction:g}")
    os.makedirs(folder, exist_ok=True)
    for name in files[: max(1, round(len(files) * fraction))]:
        link = os.path.join(folder, name)
        if not os.path.exists(link):
            os.symlink(os.path.join(os.path.abspath(corpus), name), link)
    return os.path.join(folder, "shard-*.tar")
