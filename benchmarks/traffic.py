"""Algorithmic traffic of one GAF exchange per rank, for the distributed benchmark.

Elements one rank sends and receives per step, averaged over ranks (the tiny check and
Gram collectives are left out), for N ranks each holding m micro-gradients of P numbers
(docs/design.md, "The distributed protocol"):

``"sharded"``    (m+1)·P·(N-1)/N sent and received, i.e. 2·P·(N-1)/N for m = 1;
``"allgather"``  (N-1)·m·P sent and received, N·m·P held;
``"allreduce"``  the baseline ring all-reduce of one [P] gradient, 2·P·(N-1)/N;
``"coordinatewise"``  the coordinate-wise median and trimmed mean
                 (:mod:`gaf.distributed.coordinatewise`): an all-gather of every row, as
                 "allgather", (N-1)·m·P, N·m·P held.

Every Gram rule, the robust ones (multi-krum, geometric-median) included, moves what
"sharded" moves: only the (N·m)² Gram matrix differs between rules.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Traffic:
    """Elements one rank sends and receives per step, and how many it holds at once."""

    sent: int
    received: int
    held: int  # largest gradient buffer a rank holds (in elements)

    def bytes_sent(self, element_size: int = 4) -> int:
        return self.sent * element_size


def traffic(method: str, numel: int, m: int, world_size: int) -> Traffic:
    """Per-rank traffic of ``method`` (see the module docstring), in elements."""
    n, p = world_size, numel
    if method == "sharded":
        moved = (m + 1) * p * (n - 1) // n
        return Traffic(sent=moved, received=moved, held=m * p)
    if method in ("allgather", "coordinatewise"):
        return Traffic(sent=(n - 1) * m * p, received=(n - 1) * m * p, held=n * m * p)
    if method == "allreduce":
        moved = 2 * p * (n - 1) // n
        return Traffic(sent=moved, received=moved, held=p)
    raise ValueError(f"unknown method {method!r}")
