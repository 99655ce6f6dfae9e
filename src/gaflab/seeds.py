"""Separate random streams derived from one run seed."""

from __future__ import annotations

import zlib


def stream_seed(seed: int, purpose: str) -> int:
    """A seed for one random stream (noise, subset, order, ...) derived from the run seed.

    Separate streams keep e.g. the training subset independent of which samples the noise
    picked; the same (seed, purpose) always gives the same stream.
    """
    return (int(seed) * 1_000_003 + zlib.crc32(purpose.encode())) % (2**63 - 1)
