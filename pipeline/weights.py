"""Weight files: the one home of "a checkpoint file -> a state dict of tensors, nothing unpickled", and of writing
safetensors files that two identical saves make byte for byte alike."""

from __future__ import annotations

import hashlib
import json

import safetensors.torch
import torch


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (weights files run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str, flag: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file loaded with weights_only=True.

    Unwraps a {"state_dict": ...} checkpoint and strips DataParallel's "module." prefix. Errors name `flag`, the
    command-line option the path came from.
    """
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any reader failure means the same thing to the user: not a usable weights file
        raise ValueError(f"{flag} {path!r}: cannot read a state dict from it ({e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{flag} {path!r}: expected a non-empty state dict of tensors, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """``safetensors.torch.save``, with the header's metadata in sorted key order. safetensors writes metadata in
    hash order, which changes from process to process, so two identical saves differed in their bytes (not in any
    tensor): a rerun could not be confirmed by checksum. Only the order changes, so the header keeps its length."""
    data = safetensors.torch.save(tensors, metadata=metadata)
    if not metadata or len(metadata) < 2:
        return data
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) != len(data[8 : 8 + size].rstrip(b" ")):  # another JSON spelling than expected: keep the original
        return data
    return data[:8] + text.ljust(size, b" ") + data[8 + size :]
