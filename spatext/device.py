"""The one check of a ``--device`` flag (build, sample, train-prior, eval generate / score): a device torch knows, and
a GPU this machine has."""

from __future__ import annotations

import torch


def check_device(device: str) -> None:
    """ValueError naming ``--device`` for a string torch cannot parse (``tpu``) or a CUDA device this machine lacks,
    before any model is loaded (instead of a traceback from deep inside torch)."""
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device on this machine")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
