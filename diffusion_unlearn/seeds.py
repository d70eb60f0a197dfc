"""Seeds keyed by what they are for: one per (run seed, image index), so an image never depends on batch size,
process count or which process made it (docs/cluster.md)."""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def image_seed(seed: int, index: int) -> int:
    """A 32-bit seed per (run seed, image index): torch's CPU generator keeps only the low 32 bits of a
    seed, so `seed << 32 | index` would collide across run seeds."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=4).digest(), "little")


def image_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One generator per image index, so a sample set never depends on batch size or process count."""
    return [torch.Generator().manual_seed(image_seed(seed, int(i))) for i in indices]
