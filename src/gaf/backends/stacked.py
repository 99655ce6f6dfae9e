"""The stacked backend: every micro-gradient a row, any rule and measure over them."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from torch import Tensor

from gaf.backends.buffers import OutputBuffer, RowBuffer
from gaf.core import FilterResult
from gaf.filter import filter_gradients
from gaf.flat import FlatGradients


class StackedBackend:
    """Rows [M, P] in one buffer; ``finish`` filters them (:func:`gaf.filter_gradients`).

    Subclasses replace :meth:`filter_rows` (the distributed backend decides over every
    rank's rows).
    """

    mode = "stacked"
    world_size = 1

    def __init__(self, flat: FlatGradients, rule: str, measure: str = "cosine",
                 expected_rows: int | None = None, rule_options: Mapping | None = None):
        self.flat = flat
        self.rule = rule
        self.measure = measure
        self.rule_options = rule_options
        self.buffer = RowBuffer(flat, expected_rows)
        self.output = OutputBuffer(flat)

    @property
    def rows(self) -> Tensor | None:
        return self.buffer.rows

    def buffers(self) -> list[Tensor]:
        """The buffers held between steps (for memory accounting)."""
        return [t for t in (self.buffer.rows, self.output.tensor) if t is not None]

    def start_step(self, tau: float) -> None:
        """Nothing to reset: rows are overwritten as they are collected."""

    def begin(self) -> Tensor:
        return self.buffer.ensure(1, 0)[0]

    def collect(self, k: int, verdict: bool | None) -> None:
        rows = self.buffer.ensure(k + 2, k)
        self.flat.gather(rows[k])
        rows[k + 1].zero_()
        self.flat.bind(rows[k + 1])

    def finish(self, count: int, tau: float, verdicts: np.ndarray | None) -> FilterResult:
        return self.filter_rows(self.buffer.rows[:count], tau, verdicts)

    def filter_rows(self, rows: Tensor, tau: float, verdicts: np.ndarray | None
                    ) -> FilterResult:
        """Filter the step's rows [m, P] at ``tau``; the result's ``grad`` is [P]."""
        return filter_gradients(rows, tau, self.rule, self.measure, self.flat.numels,
                                out=self.output.get(), verdicts=verdicts,
                                rule_options=self.rule_options)
