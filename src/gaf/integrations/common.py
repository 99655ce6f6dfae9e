"""What every framework integration shares: an accumulation window of micro-gradients
filtered into one step, the statistics a step reports, and DDP without its all-reduce.

:class:`MicroGradientWindow` hands each micro-gradient to a collector as it appears in
``.grad``; at the window's end the filtered direction replaces ``.grad``, multiplied back
by the framework's loss divisor, so the step is the mean of the accepted micro-gradients
as :class:`gaf.GAFTrainer` takes it (exact when the divisor is a power of two; cosine
decisions ignore a common scale). With a GradScaler a non-finite micro-gradient makes the
step an overflow, as in :class:`gaf.GAFTrainer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gaf.collector import GradientCollector
from gaf.core import FilterResult, FilterStats
from gaf.spec import FilterSpec


@dataclass
class WindowOutcome:
    """How one accumulation window ended.

    ``skipped``: the optimizer must not step (fewer than two micro-gradients agreed, or an
    overflow); ``overflow``: a micro-gradient was non-finite while a GradScaler is in use
    (the step goes to the scaler, which skips it and lowers its scale).
    """

    result: FilterResult
    skipped: bool
    overflow: bool


def trainable_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The parameters ``optimizer`` updates, in its order (frozen ones left out)."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


def build_collector(
    optimizer: torch.optim.Optimizer,
    spec: FilterSpec,
    *,
    distributed: bool,
    mode: str,
    method: str,
    timeout: float | None,
    num_micro_batches: int | None,
) -> GradientCollector:
    """A collector over ``optimizer``'s parameters filtering by ``spec``: across the
    default process group when ``distributed`` (the decision then covers every rank's
    micro-gradients; the spec's measure must then be "cosine", which the distributed
    backend checks)."""
    if not distributed:
        return GradientCollector(optimizer.param_groups, spec, mode=mode,
                                 num_micro_batches=num_micro_batches)
    if mode not in ("auto", "stacked"):
        raise ValueError(f"distributed GAF supports mode 'stacked' (or 'auto'), got mode "
                         f"{mode!r}")
    from gaf.distributed import DistributedGradientCollector

    # The framework's DDP wrapper already broadcast rank 0's parameters and broadcasts
    # buffers before every forward: the collector need not do either.
    return DistributedGradientCollector(optimizer.param_groups, spec, method=method,
                                        sync_params=False, timeout=timeout)


def disable_ddp_allreduce(model: torch.nn.parallel.DistributedDataParallel) -> None:
    """Make DDP's gradient synchronisation move no data.

    Frameworks run the window's last backward outside ``no_sync()``, so DDP would average
    the micro-gradients before GAF sees them (and move P values for nothing). A
    communication hook that returns its bucket unchanged leaves every rank's own gradient
    in ``.grad``; the GAF exchange then replaces the all-reduce. Must be called before the
    first backward; DDP accepts one hook per model.
    """
    from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

    model.register_comm_hook(None, noop_hook)


class MicroGradientWindow:
    """One accumulation window's micro-gradients, filtered into one step at its end."""

    def __init__(self, collector: GradientCollector, params: list[Tensor]):
        self.collector = collector
        self.params = params

    def before_backward(self) -> None:
        """At a window's first backward, let it accumulate straight into the collector."""
        if self.collector.num_collected == 0:
            self.collector.begin()

    def after_backward(
        self, *, last: bool, loss_divisor: float, scaler: bool
    ) -> WindowOutcome | None:
        """Take the micro-gradient now in ``.grad``; at the window's ``last`` one, filter
        and leave the step's direction (or inf, on an overflow) in ``.grad``.

        ``loss_divisor``: what the framework divided each micro-batch loss by;
        ``scaler``: whether a GradScaler scales the losses.
        """
        self.collector.collect()
        if not last:
            return None
        return self.finish(loss_divisor=loss_divisor, scaler=scaler)

    def finish(self, *, loss_divisor: float, scaler: bool) -> WindowOutcome:
        """Filter what the window collected (e.g. when its last micro-batch ran no
        backward) and leave the step's direction in ``.grad``; see :meth:`after_backward`."""
        # With a scaler, an overflow leaves inf in .grad for the scaler to find.
        result = self.collector.finish(amp=scaler)
        overflow = result.extra["overflow"]
        if not overflow and not result.skipped and loss_divisor != 1:
            grads = [p.grad for p in self.params if p.grad is not None]
            torch._foreach_mul_(grads, float(loss_divisor))
        return WindowOutcome(result, result.skipped or overflow, overflow)


def step_statistics(
    result: FilterResult, stats: FilterStats | None = None, overflow: bool = False
) -> dict[str, float]:
    """The scalars a logger records for one filtered step (host values: no device sync).

    ``skipped`` (1 or 0), ``accepted`` (micro-gradients kept), ``acceptance`` (their
    fraction), ``distance`` (mean cosine distance of the valid non-anchor micro-gradients
    to the running direction; absent when there is none), ``tau``, ``invalid``, given
    the running ``stats``, ``skip_rate`` and ``acceptance_rate`` so far, and ``b_simple``
    (the gradient noise scale) where the collector measures it.
    """
    row = {
        "skipped": float(result.skipped or overflow),
        "accepted": float(result.num_accepted),
        "acceptance": float(result.acceptance_rate),
        "tau": float(result.tau),
        "invalid": float(result.num_invalid),
    }
    mask = torch.ones(result.num_micro_batches, dtype=torch.bool)
    if 0 <= result.anchor < mask.numel():
        mask[result.anchor] = False
    if result.valid is not None:
        mask &= result.valid.to(torch.bool)
    if bool(mask.any()):
        row["distance"] = float(result.distances[mask].double().mean())
    if stats is not None:
        row["skip_rate"] = float(stats.skip_rate)
        row["acceptance_rate"] = float(stats.acceptance_rate)
    b_simple = result.extra.get("b_simple")
    if b_simple is not None and math.isfinite(b_simple):  # the collector's gaf.NoiseScale
        row["b_simple"] = float(b_simple)
    return row
