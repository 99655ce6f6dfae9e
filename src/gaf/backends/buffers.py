"""Buffers a collector keeps between steps, so that a step allocates nothing.

A fresh P-sized allocation every step costs page faults on the CPU and allocator work
elsewhere; DDP keeps its buckets for the same reason.
"""

from __future__ import annotations

from torch import Tensor

from gaf.flat import FlatGradients


class OutputBuffer:
    """The [P] buffer a step's direction is written to, reused across steps."""

    def __init__(self, flat: FlatGradients):
        self.flat = flat
        self.tensor: Tensor | None = None

    def get(self) -> Tensor:
        if self.tensor is None:
            self.tensor = self.flat.new_buffer()
        return self.tensor

    def swap(self, other: Tensor) -> Tensor:
        """Make ``other`` the output and return the previous one (allocated if needed):
        the streaming sum becomes the result in place, the old result the next sum."""
        previous = self.get()
        self.tensor = other
        return previous


class RowBuffer:
    """Rows [capacity, P] for a step's micro-gradients; row k + 1 is bound to ``.grad``
    while row k is taken, so M micro-batches need M + 1 rows. Grows by doubling."""

    def __init__(self, flat: FlatGradients, expected_rows: int | None):
        self.flat = flat
        self.expected = expected_rows
        self.rows: Tensor | None = None

    def ensure(self, needed: int, filled: int) -> Tensor:
        """At least ``needed`` rows, keeping the first ``filled``."""
        if self.rows is not None and needed <= self.rows.shape[0]:
            return self.rows
        first = (self.expected or 3) + 1
        capacity = max(needed, first if self.rows is None else 2 * self.rows.shape[0])
        rows = self.flat.new_buffer(capacity)
        self.flat.forget_views()  # cached views would keep the old buffer alive
        if self.rows is not None:
            rows[:filled].copy_(self.rows[:filled])
            # .grad may be bound to the old buffer's row k: gather() copies it over.
        self.rows = rows
        return rows
