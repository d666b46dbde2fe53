"""The one stable hash of a sample key: the same 64 bits in every process, run and machine (unlike `hash`).

Used where a key must map to the same number everywhere: dedupe's key hashes (pipeline/dedupe.py), the prior's
held-out split and the loader's per-sample re-sampling seed (model/).
"""

from __future__ import annotations

import hashlib


def key_hash(key: str) -> int:
    """A 64-bit hash of a key (blake2b, little-endian), the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
