"""The spatio-textual representation ST: each segment's CLIP embedding painted into its pixels, zeros elsewhere.

ST is built on the training device from the small integer label map and the K embeddings (a gather from a
(K+1) x D table whose row 0 is zero), never as a dense CPU tensor.

Downsampling the label map to the denoiser's resolution (`downsample_label_map`) keeps small segments, which the
SpaText paper reports being ignored:

1. Each input pixel belongs to exactly one output cell (row y -> floor(y*h/H), likewise for columns); per cell the
   pixel count of every label is a `bincount` on the device.
2. Each cell takes its majority label; background (0) counts as a label, so large segments keep their shape and
   roughly their area. Ties go to the lowest label (background first).
3. Rescue: a segment with at least `min_cells` cells' worth of pixels (default one cell: H*W/(h*w) pixels) that got
   no cell in step 2 takes round(pixels / cell area) cells (at least one): its highest-coverage cells, ties in
   raster order. It may take a cell from the background or from a segment that keeps at least one other cell,
   never a segment's last cell. Segments are rescued smallest first (ties: lower label), one sample at a time on the
   CPU (only samples that need it; the check itself runs on the device).

Guarantee: every segment with >= one cell of pixels survives unless all the cells it touches are the last cells of
other segments (then it cannot without erasing another). Segments below one cell's worth of pixels (e.g. 3 x 3
pixels when a cell is 8 x 8) may vanish. Axes that are upsampled use nearest neighbour, which loses nothing.
"""

from __future__ import annotations

import numpy as np
import torch


def _nearest_upsample(label_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour along each axis whose target is larger (every input row / column is kept)."""
    _, height, width = label_map.shape
    if size[0] > height:
        rows = torch.arange(size[0], device=label_map.device) * height // size[0]
        label_map = label_map.index_select(1, rows)
    if size[1] > width:
        cols = torch.arange(size[1], device=label_map.device) * width // size[1]
        label_map = label_map.index_select(2, cols)
    return label_map


def label_coverage(label_map: torch.Tensor, size: tuple[int, int], num_labels: int) -> torch.Tensor:
    """Pixel counts per (sample, label, cell): B x H x W labels -> B x num_labels x (h*w) int64 (h <= H, w <= W)."""
    batch, height, width = label_map.shape
    h, w = size
    device = label_map.device
    cell_y = torch.arange(height, device=device) * h // height
    cell_x = torch.arange(width, device=device) * w // width
    cell = (cell_y[:, None] * w + cell_x[None, :]).unsqueeze(0)  # 1 x H x W
    sample = torch.arange(batch, device=device).view(batch, 1, 1)
    flat = (sample * num_labels + label_map.long()) * (h * w) + cell
    counts = torch.bincount(flat.reshape(-1), minlength=batch * num_labels * h * w)
    if counts.numel() != batch * num_labels * h * w:
        raise ValueError(f"label_map holds labels > num_segments={num_labels - 1}")
    return counts.view(batch, num_labels, h * w)


def _rescue_sample(labels: np.ndarray, coverage: np.ndarray, missing: np.ndarray, cell_area: float) -> np.ndarray:
    """Greedy rescue in one sample (see the module docstring): labels (h*w,), coverage (K+1, h*w)."""
    labels = labels.copy()
    owned = np.bincount(labels, minlength=coverage.shape[0])
    totals = coverage.sum(axis=1)
    for seg in sorted(missing, key=lambda s: (totals[s], s)):
        want = max(1, int(round(totals[seg] / cell_area)))
        candidates = np.flatnonzero(coverage[seg] > 0)
        candidates = candidates[np.lexsort((candidates, -coverage[seg][candidates]))]  # coverage desc, raster asc
        taken = 0
        for cell in candidates:
            owner = labels[cell]
            if owner == seg or (owner != 0 and owned[owner] <= 1):
                continue
            labels[cell] = seg
            owned[owner] -= 1
            owned[seg] += 1
            taken += 1
            if taken == want:
                break
    return labels


def downsample_label_map(
    label_map: torch.LongTensor, size: tuple[int, int], num_segments: int | None = None, *, min_cells: float = 1.0
) -> torch.LongTensor:
    """B x H x W -> B x h x w keeping every segment whose area covers >= one output cell's worth of pixels.

    `num_segments` is the largest label K (read from the map when None, which costs a device sync); `min_cells` is
    the rescue threshold in cells (`float('inf')` gives the plain majority vote). See the module docstring.
    """
    if label_map.dim() != 3:
        raise ValueError(f"label_map must be B x H x W, got shape {tuple(label_map.shape)}")
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size}")
    label_map = _nearest_upsample(label_map.long(), (h, w))
    batch, height, width = label_map.shape
    if (height, width) == (h, w):
        return label_map
    num_labels = (int(label_map.max()) if num_segments is None else int(num_segments)) + 1
    coverage = label_coverage(label_map, (h, w), num_labels)  # B x (K+1) x hw
    labels = coverage.argmax(dim=1)  # majority; argmax returns the first maximum -> lowest label on ties
    cell_area = height * width / (h * w)
    owned = torch.zeros(batch, num_labels, dtype=torch.long, device=labels.device)
    owned.scatter_add_(1, labels, torch.ones_like(labels))
    missing = (coverage.sum(dim=2) >= min_cells * cell_area) & (owned == 0)
    missing[:, 0] = False
    any_missing, too_large = torch.stack([missing.any(), label_map.max() >= num_labels]).tolist()  # one sync
    if too_large:
        raise ValueError(f"label_map holds labels > num_segments={num_labels - 1}")
    if any_missing:
        for b in torch.nonzero(missing.any(dim=1)).flatten().tolist():
            segs = torch.nonzero(missing[b]).flatten().tolist()
            fixed = _rescue_sample(labels[b].cpu().numpy(), coverage[b].cpu().numpy(), np.array(segs), cell_area)
            labels[b] = torch.from_numpy(fixed).to(labels.device)
    return labels.view(batch, h, w)


def build_st(
    label_map: torch.LongTensor, segment_embeddings: torch.Tensor, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """(B x H x W labels, B x K x D embeddings) -> B x D x h x w ST on label_map's device (a gather; 0 where label 0).

    Label i paints row i-1 of the sample's embeddings; labels must be <= K. With `size`, the map is first reduced by
    `downsample_label_map` (small segments kept). The result has the embeddings' dtype.
    """
    if label_map.dim() != 3 or segment_embeddings.dim() != 3:
        raise ValueError(f"need label_map B x H x W and segment_embeddings B x K x D, got "
                         f"{tuple(label_map.shape)} and {tuple(segment_embeddings.shape)}")
    if label_map.shape[0] != segment_embeddings.shape[0]:
        raise ValueError(f"batch sizes differ: label_map {label_map.shape[0]}, "
                         f"segment_embeddings {segment_embeddings.shape[0]}")
    batch, num_segments, dim = segment_embeddings.shape
    if size is not None and tuple(size) != tuple(label_map.shape[1:]):
        label_map = downsample_label_map(label_map, size, num_segments)
    _, h, w = label_map.shape
    if label_map.device.type == "cpu" and label_map.numel() and int(label_map.max()) > num_segments:
        # checked on the CPU only: on a GPU this would wait for the device every step, and its gather fails loudly
        raise ValueError(f"label_map holds labels > num_segments={num_segments}")
    embeddings = segment_embeddings.to(label_map.device)
    table = torch.cat([embeddings.new_zeros(batch, 1, dim), embeddings], dim=1)  # B x (K+1) x D, row 0 = nothing
    index = label_map.reshape(batch, h * w, 1).long().expand(batch, h * w, dim)
    st = table.gather(1, index)  # B x hw x D
    return st.transpose(1, 2).reshape(batch, dim, h, w)
