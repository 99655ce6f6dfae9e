"""The averaging backend: plain gradient accumulation through the same loop, no filter.

Each micro-batch's loss is divided by M (``divides_loss``) and back-propagated into the
buffer bound at :meth:`AveragingBackend.begin`, which then holds Σ_k ∇loss_k / M. The
result reports every micro-batch accepted with weight 1/M, distances NaN, rule "average".
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gaf.core import FilterResult
from gaf.micrograds.backend import BatchPass, needs_backwards
from gaf.micrograds.flat import FlatGradients, OutputBuffer


class AveragingBackend:
    """Accumulates every micro-gradient in one buffer; ``finish`` returns it unfiltered."""

    mode = "average"
    world_size = 1
    one_pass = False
    divides_loss = True

    def __init__(self, flat: FlatGradients):
        self.flat = flat
        self.output = OutputBuffer(flat)

    def start_step(self, tau: float) -> None:
        """Nothing to reset: :meth:`begin` zeroes the buffer."""

    def begin(self) -> Tensor:
        return self.output.get()

    def collect(self, k: int, verdict: bool | None) -> None:
        """Nothing to take: the next backward adds to the same ``.grad``."""

    def collect_batch(self, batch: BatchPass) -> Tensor:
        raise needs_backwards(self.mode)

    def finish(self, count: int, tau: float, verdicts: np.ndarray | None) -> FilterResult:
        # Parameters whose .grad was replaced (not bound to the buffer) are copied in.
        grad = self.flat.gather(self.output.get())
        m = count
        return FilterResult(
            grad=grad, accepted=torch.ones(m, dtype=torch.bool),
            distances=torch.full((m,), float("nan"), dtype=torch.float64),
            weights=torch.full((m,), 1.0 / m, dtype=torch.float64), anchor=0,
            num_invalid=0, tau=2.0, rule="average", valid=torch.ones(m, dtype=torch.bool),
            min_accepted=1,  # one micro-batch is an ordinary SGD step
        )

    def buffers(self) -> list[Tensor]:
        return [t for t in (self.output.tensor,) if t is not None]

    def state(self) -> dict:
        return {}
