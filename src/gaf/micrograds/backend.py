"""The one interface every micro-gradient backend implements.

A :class:`~gaf.collector.GradientCollector` holds one backend and talks to it only through
:class:`Backend`; what is common to all of them (the step's threshold, a control's
verdicts, writing the direction into ``.grad``, AMP overflow, statistics and state) lives
in the collector. Per step::

    backend.start_step(tau)
    target = backend.begin()                       # zeroed buffer the first backward fills
    either, after each micro-batch's backward:     # backend.one_pass is False
        backend.collect(k, verdict)                # take micro-gradient k out of .grad
    or, once for the whole batch:                  # backend.one_pass is True
        losses = backend.collect_batch(pass_)      # one forward and backward of the batch
    result = backend.finish(count, tau, verdicts)  # FilterResult; grad in a reused buffer

Implementations: :mod:`gaf.micrograds` and :class:`gaf.distributed.backend.DistributedBackend`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from torch import Tensor, nn

from gaf.core import FilterResult
from gaf.micrograds.flat import OutputBuffer


@dataclass(frozen=True)
class BatchPass:
    """What a one-pass backend needs to run one forward and backward of a whole batch."""

    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    inputs: Tensor | Sequence[Tensor]
    targets: Tensor
    num_micro_batches: int
    scale: Callable[[Tensor], Tensor] | None = None  # e.g. GradScaler.scale
    autocast: Callable[[], object] | None = None  # context manager factory, or None


@runtime_checkable
class Backend(Protocol):
    """How a step's micro-gradients are held and filtered (module docstring).

    ``mode``: the name results and checkpoints carry ("streaming", "stacked", "one-pass",
    "average"). ``world_size``: processes whose rows one decision covers. ``one_pass``:
    rows come from :meth:`collect_batch` instead of one :meth:`collect` per backward.
    ``divides_loss``: each micro-batch's loss is divided by M before its backward (plain
    gradient accumulation); the filters take every micro-gradient at full scale.
    """

    mode: str
    world_size: int
    one_pass: bool
    divides_loss: bool
    output: OutputBuffer  # where finish() writes the direction, reused across steps

    def start_step(self, tau: float) -> None:
        """Reset the per-step state; ``tau`` is the step's threshold."""

    def begin(self) -> Tensor:
        """The zeroed [P] buffer the step's first backward should accumulate into."""

    def collect(self, k: int, verdict: bool | None) -> None:
        """Take micro-gradient ``k`` out of ``.grad`` (``verdict``: a control's, or None)."""

    def collect_batch(self, batch: BatchPass) -> Tensor:
        """Every micro-gradient of ``batch`` from one pass; returns the M micro losses."""

    def finish(self, count: int, tau: float, verdicts: np.ndarray | None) -> FilterResult:
        """Decide over the ``count`` rows of the step and compute the direction."""

    def buffers(self) -> list[Tensor]:
        """The buffers held between steps (for memory accounting)."""

    def state(self) -> dict:
        """What a checkpoint must hold to refuse a resume under another backend."""


def needs_one_pass(mode: str) -> TypeError:
    """The error a per-backward call on a one-pass backend raises."""
    return TypeError(f"the {mode} backend takes a whole batch in one pass: use "
                     "GradientCollector.collect_batch (or GAFTrainer.step), not collect()")


def needs_backwards(mode: str) -> TypeError:
    """The error a whole-batch call on a per-backward backend raises."""
    return TypeError(f"the {mode} backend takes one micro-gradient per backward: call "
                     "collect() after each micro-batch's backward")
