"""The stacked backend: every micro-gradient a row, any rule and measure over them."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from gaf.core import FilterResult, filter_gradients
from gaf.micrograds.backend import BatchPass, needs_backwards
from gaf.micrograds.flat import FlatGradients, OutputBuffer, RowBuffer
from gaf.spec import FilterSpec


class StackedBackend:
    """Rows [M, P] in one buffer; ``finish`` filters them (:func:`gaf.filter_gradients`).

    Subclasses replace :meth:`filter_rows` (the distributed backend decides over every
    rank's rows).
    """

    mode = "stacked"
    world_size = 1
    one_pass = False
    divides_loss = False

    def __init__(self, flat: FlatGradients, spec: FilterSpec,
                 expected_rows: int | None = None):
        self.flat = flat
        self.rule = spec.rule
        self.measure = spec.measure
        self.rule_options = spec.rule_options
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

    def collect_batch(self, batch: BatchPass) -> Tensor:
        raise needs_backwards(self.mode)

    def state(self) -> dict:
        return {}

    def finish(self, count: int, tau: float, verdicts: np.ndarray | None) -> FilterResult:
        return self.filter_rows(self.buffer.rows[:count], tau, verdicts)

    def filter_rows(self, rows: Tensor, tau: float, verdicts: np.ndarray | None
                    ) -> FilterResult:
        """Filter the step's rows [m, P] at ``tau``; the result's ``grad`` is [P]."""
        return filter_gradients(rows, tau, self.rule, self.measure, self.flat.numels,
                                out=self.output.get(), verdicts=verdicts,
                                rule_options=self.rule_options)
