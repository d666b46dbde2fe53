"""Split a segmenter batch into forward passes of similar shapes, so that little of each pass is padding.

Mask2Former's processor scales every image to a shortest edge (``--segmenter-processor-size``, the longest edge
capped), then pads the batch to its largest height and largest width. A batch that mixes portrait and landscape
images pads every image to a square of the long edge: on the demo corpus, batches of 8 in corpus order ran on 1.84x
the pixels of their processed images (an H100 build ran at a third of Mask2Former's rate on 512 px squares). Sorted
by aspect ratio and cut into contiguous groups, they run on 1.10x in 2.6 passes a batch: more, smaller passes; each
costs about one image's worth of fixed work (an H100's Swin-L Mask2Former: 10 ms a pass + 8.4 ms an image at
512 px, from its batch 8 / 16 / 32 rates), which ``pass_cost`` charges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from transformers.image_transforms import get_size_with_aspect_ratio


def processed_shape(height: int, width: int, shortest: int, longest: int | None, divisor: int = 32) -> tuple[int, int]:
    """The (height, width) Mask2Former's processor gives an image: transformers' own rule (shortest edge to
    ``shortest`` unless the longest would pass ``longest``), then each side rounded up to ``divisor``."""
    new_height, new_width = get_size_with_aspect_ratio((height, width), shortest, longest)
    step = max(divisor, 1)
    return math.ceil(new_height / step) * step, math.ceil(new_width / step) * step


def shape_groups(shapes: Sequence[tuple[int, int]], pass_cost: float) -> list[list[int]]:
    """Indices of ``shapes`` (processed (height, width)) in groups, one forward pass each, that minimise the pixels
    run (each group: its size x its largest height x its largest width) plus ``pass_cost`` pixels per pass.

    The groups are contiguous runs of the images sorted by aspect ratio (ties by input order); the best cut of that
    order is found exactly (dynamic programming, O(n^2)). Each group lists its indices in input order."""
    if pass_cost < 0:
        raise ValueError(f"pass_cost must be >= 0, got {pass_cost}")
    order = sorted(range(len(shapes)), key=lambda i: (shapes[i][0] / shapes[i][1], i))
    best = [0.0] + [math.inf] * len(order)  # best[j]: the cheapest cut of order[:j]
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        tallest = widest = 0
        for start in range(end - 1, -1, -1):  # the last group is order[start:end]
            height, width = shapes[order[start]]
            tallest, widest = max(tallest, height), max(widest, width)
            cost = best[start] + pass_cost + (end - start) * tallest * widest
            if cost <= best[end]:  # ties: the longer last group, so fewer passes
                best[end], cut[end] = cost, start
    groups = []
    end = len(order)
    while end:
        groups.append(sorted(order[cut[end]:end]))
        end = cut[end]
    return sorted(groups)
