"""Split a segmenter batch into forward passes of similar shapes, so that little of each pass is padding.

Mask2Former's processor scales every image to a shortest edge (``--segmenter-processor-size``, the longest edge
capped), then pads the batch to its largest height and largest width. A batch that mixes portrait and landscape
images pads every image to a square of the long edge: batches of 8 demo images in corpus order ran on 1.80x the
pixels of their processed images. But a pass has a floor: on an H100 (Swin-L, bf16, eager) a forward of 8 images of
512 x 512 took 78 ms, and at batch 32 8.8 ms an image, so a pass of fewer than about 9 such images' worth of pixels
costs what 9 would, launching its kernels. Cut with no floor (one image's worth per pass), those batches ran in 2.4
passes on 1.12x their pixels at 41.6 img/s against 48.9 in one pass; the model ``max(78 ms, 8.8 ms x 512 px images
of pixels)`` per pass, fitted on the squares, predicted 43.2 and 46.5 img/s for them. With the floor
(``MIN_PASS_PIXELS``, a fixed number of pixels: the launch time does not grow with the processor's size) it predicts
1.10x the one-pass rate for batches of 8, 1.65x for 16 and 1.88x for 32. Measured on an H100 on 32 demo images in
batches of 16, the bare forward over shapes run before: 1.44x (68.3 vs 47.5 img/s).
Batches of 6 or fewer never split at a 512 px processor size (an image is at most 2.8 such squares there).

Passes are also padded to a coarse grid (``shape_step``: a quarter of the shortest edge, 128 px at 512 px) rather
than the processor's 32 px: the model's first pass of each new (batch, height, width) is slow. On an H200 (Swin-L,
bf16, eager; ``benchmarks/segmenter_shapes.py``, ``benchmarks/results/segmenter_shapes_h200*.json``) batches whose
pass shapes the model had not run took 0.09-0.46 s more per new shape than the same batches again (batches of 16
demo images in two passes each: 20.1 img/s on new shapes, 61.9 again; cuDNN off: 0.09 and 0.28 s in two runs, so it
does not remove the cost, and the figures count a shape an earlier set-up ran as new). Over 2,000
batches of 16 demo images the passes had 193 distinct shapes on the 32 px grid (37 in the first 64 batches) and 53 on
the 128 px one (27), for 3% more pixels; batches of 8: 195 and 32 (48 and 20 in the first 64). Long jobs meet every
shape early either way; short ones (a benchmark, a 5,000-image validation set) pay for each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from transformers.image_transforms import get_size_with_aspect_ratio

MIN_PASS_PIXELS = 9 * 512 * 512  # a pass costs at least this many pixels' worth of time; see above
STEPS_PER_EDGE = 4  # passes are padded to multiples of shortest edge / 4 (128 px at 512 px); see above


def shape_step(shortest: int, divisor: int = 32) -> int:
    """The grid passes are padded to: about ``shortest / STEPS_PER_EDGE``, a multiple of the processor's ``divisor``
    (the model's own constraint), at least one ``divisor``."""
    step = max(divisor, 1)
    return max(1, round(shortest / STEPS_PER_EDGE / step)) * step


def processed_shape(height: int, width: int, shortest: int, longest: int | None, divisor: int = 32) -> tuple[int, int]:
    """The (height, width) Mask2Former's processor gives an image: transformers' own rule (shortest edge to
    ``shortest`` unless the longest would pass ``longest``), then each side rounded up to ``divisor``."""
    new_height, new_width = get_size_with_aspect_ratio((height, width), shortest, longest)
    step = max(divisor, 1)
    return math.ceil(new_height / step) * step, math.ceil(new_width / step) * step


def shape_groups(shapes: Sequence[tuple[int, int]], min_pass_pixels: float) -> list[list[int]]:
    """Indices of ``shapes`` (processed (height, width)) in groups, one forward pass each, that minimise the summed
    cost of the passes: a pass runs its size x its largest height x its largest width pixels, and costs at least
    ``min_pass_pixels`` (below that a forward is bound by launching its kernels, not by its pixels).

    The groups are contiguous runs of the images sorted by aspect ratio (ties by input order); the best cut of that
    order is found exactly (dynamic programming, O(n^2)); equal costs go to fewer passes. Each group lists its indices
    in input order."""
    if min_pass_pixels < 0:
        raise ValueError(f"min_pass_pixels must be >= 0, got {min_pass_pixels}")
    order = sorted(range(len(shapes)), key=lambda i: (shapes[i][0] / shapes[i][1], i))
    best = [0.0] + [math.inf] * len(order)  # best[j]: the cheapest cut of order[:j]
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        tallest = widest = 0
        for start in range(end - 1, -1, -1):  # the last group is order[start:end]
            height, width = shapes[order[start]]
            tallest, widest = max(tallest, height), max(widest, width)
            cost = best[start] + max(min_pass_pixels, (end - start) * tallest * widest)
            if cost <= best[end]:  # ties: the longer last group, so fewer passes
                best[end], cut[end] = cost, start
    groups = []
    end = len(order)
    while end:
        groups.append(sorted(order[cut[end]:end]))
        end = cut[end]
    return sorted(groups)
