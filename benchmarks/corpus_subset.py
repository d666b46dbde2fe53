"""A smaller build input of the same kind (links to the first tars of a demo corpus), and a larger one (renamed copies).

Benchmarks run a subset build (nominally a quarter) and the full build and take the difference, so that start-up
(model loading, worker processes, pipeline construction) cancels out, as it does in a job over millions of images.
The subset is a whole number of tars, so its real size is what the tar granularity allows (with 2 tars, a quarter
is 1 of 2): the benchmarks compute with, and report, the samples each build actually read.
"""

from __future__ import annotations

import io
import math
import os
import tarfile


def subset_tar_count(total: int, fraction: float) -> int:
    """The number of tars nearest to `fraction` of `total` (halves round up), at least one and, when there are two or
    more, fewer than all of them, so that the full build always has tars the subset lacks."""
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    return min(max(1, math.floor(total * fraction + 0.5)), max(1, total - 1))


def corpus_subset(corpus: str, fraction: float) -> str:
    """A folder of symlinks to the first `subset_tar_count` of the corpus's tars (links left there by a corpus of
    another size are removed); returns its glob pattern."""
    files = sorted(f for f in os.listdir(corpus) if f.endswith(".tar"))
    if not files:
        raise ValueError(f"no .tar files in {corpus}")
    folder = os.path.join(corpus, f"subset-{fraction:g}")
    os.makedirs(folder, exist_ok=True)
    chosen = files[: subset_tar_count(len(files), fraction)]
    for name in set(os.listdir(folder)) - set(chosen):
        if os.path.islink(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    for name in chosen:
        link = os.path.join(folder, name)
        if not os.path.exists(link):
            os.symlink(os.path.join(os.path.abspath(corpus), name), link)
    return os.path.join(folder, "shard-*.tar")


def replicate_corpus(corpus: str, copies: int) -> int:
    """Add ``copies - 1`` renamed copies of each tar of a demo corpus (``shard-rN-*.tar``, keys prefixed ``rN-``;
    image and caption members only, which is what a build with a model segmenter reads): a large build input without
    drawing every image, which takes about 50 ms a sample in one process. Copies left by an earlier call are removed
    first. Returns the number of tars added."""
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    for name in os.listdir(corpus):
        if name.startswith("shard-r") and name.endswith(".tar"):
            os.remove(os.path.join(corpus, name))
    originals = sorted(f for f in os.listdir(corpus) if f.endswith(".tar") and not f.startswith("shard-r"))
    if not originals:
        raise ValueError(f"no .tar files in {corpus}")
    added = 0
    for copy in range(1, copies):
        for name in originals:
            target = os.path.join(corpus, name.replace("shard-", f"shard-r{copy}-", 1))
            with tarfile.open(os.path.join(corpus, name)) as source, tarfile.open(target + ".tmp", "w") as out:
                for member in source.getmembers():
                    if member.isfile() and member.name.endswith((".jpg", ".txt")):
                        data = source.extractfile(member).read()
                        info = tarfile.TarInfo(f"r{copy}-{member.name}")
                        info.size = len(data)
                        out.addfile(info, io.BytesIO(data))
            os.replace(target + ".tmp", target)
            added += 1
    return added
