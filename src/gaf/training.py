"""One-call GAF training step on one device.

:class:`GAFTrainer` splits a batch into M micro-batches, collects their gradients with a
:class:`~gaf.collector.GradientCollector` (under ``torch.autocast`` and a GradScaler if
asked), then steps, or skips the step when fewer than 2 micro-gradients agree (no
``optimizer.step()``, no ``scaler.update()``, ``StepResult.skipped``). With AMP it
unscales before clipping; clipping applies after filtering. An overflowing micro-gradient
is handed to the scaler as an overflow, so it skips and backs off as without GAF.
``on_micro_gradient(k)`` runs while ``.grad`` holds micro-gradient k (with
``mode="average"``: the accumulated gradient Σ_{i<=k} ∇loss_i / M); changes made there are
what the filter sees. ``mode="average"`` is plain gradient accumulation through the same
loop (``distances`` NaN). See docs/guide.md, "Training semantics".
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gaf.collector import GradientCollector, split_batch
from gaf.core import FilterResult, FilterStats
from gaf.micrograds import OnePassBackend
from gaf.spec import FilterSpec

MICRO_GRADIENTS = ("sequential", "one-pass")
ONE_PASS_ALONE = ("micro_gradients='one-pass' takes no collector, mode or measure: it "
                  "filters by cosine from its own Gram matrix")

__all__ = ["GAFTrainer", "OnePassFilter", "StepResult", "collect_one_pass",
           "one_pass_filter", "split_batch"]


@dataclass
class StepResult:
    """What one :meth:`GAFTrainer.step` did. ``loss`` is a detached device tensor (mean of
    the micro-batch losses): reading it with ``.item()`` is the caller's choice of sync."""

    loss: Tensor
    skipped: bool
    overflow: bool
    result: FilterResult


def check_optimizer_params(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer that updates none of ``model``'s parameters: the filter would
    read gradients no backward writes, skip every step, and ``.grad`` of the real model
    would grow without bound. (A model that is not an ``nn.Module`` is not checked.)"""
    if not isinstance(model, nn.Module):
        return
    own = {id(p) for p in model.parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if own and params and not any(id(p) in own for p in params):
        raise ValueError(
            f"the optimizer's {len(params)} parameters include none of the model's: build "
            "it over this model, e.g. torch.optim.SGD(model.parameters(), ...)")


class GAFTrainer:
    """Drop-in GAF step for a model, any ``torch.optim`` optimizer and a loss function.

    Args:
        model: the module to train.
        optimizer: any ``torch.optim.Optimizer`` over (some of) the model's parameters.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (mean over the micro-batch).
        num_micro_batches: M, the number of micro-batches each batch is split into.
        spec: the filter (:class:`gaf.FilterSpec`); keyword arguments ``tau``, ``rule``,
            ``rule_options``, ``measure``, ``control`` are sugar that build it.
        mode: the backend, as for :class:`~gaf.collector.GradientCollector`: "auto",
            "streaming", "stacked" or "average" (plain averaging through the same loop,
            no filter; module docstring).
        max_grad_norm: clip the filtered gradient to this norm (None: no clipping).
        scaler: a ``torch.amp.GradScaler`` for mixed precision (None: no scaling).
        autocast_dtype: run forward passes under ``torch.autocast`` with this dtype.
        collector: a ready collector (e.g. a distributed one) to use instead of building
            one from ``spec`` and ``mode``.
        micro_gradients: "sequential" (M forward/backward passes, the default) or
            "one-pass" (one forward and backward of the whole batch, same decisions and
            direction; see :mod:`gaf.micrograds.one_pass` for the layers and losses it
            supports).
        average: deprecated alias of ``mode="average"``.

    One micro-batch per step on one device is refused: one micro-gradient can agree with
    no other, so every step would be skipped (distributed, m = 1 per rank is fine).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[Tensor, Tensor], Tensor], num_micro_batches: int,
                 spec: FilterSpec | None = None, *, mode: str = "auto",
                 max_grad_norm: float | None = None, scaler: torch.amp.GradScaler | None = None,
                 autocast_dtype: torch.dtype | None = None,
                 collector: GradientCollector | None = None, micro_gradients: str = "sequential",
                 average: bool = False, **filter_options):
        if isinstance(num_micro_batches, bool) or not isinstance(num_micro_batches, int) \
                or num_micro_batches < 1:
            raise ValueError(f"num_micro_batches must be a positive int, got {num_micro_batches!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        if micro_gradients not in MICRO_GRADIENTS:
            raise ValueError(f"unknown micro_gradients {micro_gradients!r}; choose one of "
                             f"{', '.join(MICRO_GRADIENTS)}")
        check_optimizer_params(model, optimizer)
        if average:
            warnings.warn("GAFTrainer(average=True) is deprecated: use mode='average'",
                          DeprecationWarning, stacklevel=2)
            mode = "average"
        if mode == "average" and (collector is not None or micro_gradients != "sequential"
                                  or spec is not None or filter_options):
            raise ValueError("mode='average' (plain averaging) filters nothing: it takes no "
                             "collector, spec, filter options or one-pass micro-gradients")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.num_micro_batches = num_micro_batches
        self.max_grad_norm = max_grad_norm
        self.scaler = scaler
        self.autocast_dtype = autocast_dtype
        self.micro_gradients = micro_gradients
        if micro_gradients == "one-pass" and (collector is not None or mode != "auto"):
            raise ValueError(ONE_PASS_ALONE)
        if collector is None:
            backend = None
            if micro_gradients == "one-pass":
                backend = lambda flat, spec: OnePassBackend(model, flat, spec)  # noqa: E731
            collector = GradientCollector(optimizer.param_groups, spec, mode=mode,
                                          num_micro_batches=num_micro_batches,
                                          backend=backend, **filter_options)
        elif spec is not None or filter_options or mode != "auto":
            raise ValueError("a ready collector brings its own spec and backend: give "
                             "collector= alone, or spec/mode without it")
        self.collector = collector
        if collector.mode != "average" and num_micro_batches * collector.world_size < 2:
            raise ValueError(
                "num_micro_batches=1 on one device: a single micro-gradient can agree "
                "with no other, so every step would be skipped; use M >= 2 (or "
                "mode='average' for plain steps)"
            )
        if collector.mode != "average":  # e.g. multi-Krum's M > 2f + 2, known here
            collector.spec.check_rows(num_micro_batches * collector.world_size)
        self.overflow_steps = 0

    @property
    def average(self) -> bool:
        """Whether the steps are plain averaging (``mode="average"``)."""
        return self.collector.mode == "average"

    @property
    def stats(self) -> FilterStats:
        return self.collector.stats

    @property
    def params(self) -> list[Tensor]:
        """The trainable parameters the step updates (and clips), in the optimizer's order."""
        return self.collector.params

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.collector.flat.device.type,
                              dtype=self.autocast_dtype)

    def step(self, inputs: Tensor | Sequence[Tensor], targets: Tensor,
             on_micro_gradient: Callable[[int], None] | None = None) -> StepResult:
        """One training step over ``inputs``/``targets`` split into M micro-batches.

        ``on_micro_gradient(k)``, if given, runs after micro-batch k's backward while
        ``.grad`` holds micro-gradient k (with averaging: the accumulated gradient),
        before the collector takes it; see the module docstring.
        """
        ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        # A DDP model's own all-reduce must not run: it would average the micro-gradients
        # before the filter sees them (and move P values for nothing).
        with self.model.no_sync() if ddp and not self.average else nullcontext():
            loss = self.collector.collect_batch(
                self.model, self.loss_fn, inputs, targets, self.num_micro_batches,
                scale=self.scaler.scale if self.scaler is not None else None,
                autocast=self._autocast, on_micro_gradient=on_micro_gradient)
        result = self.collector.finish(amp=self.scaler is not None)
        if result.extra["overflow"]:
            # .grad holds inf: the scaler skips the step and lowers its scale.
            self.overflow_steps += 1
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss, True, True, result)
        if result.skipped:
            return StepResult(loss, True, False, result)
        if self.scaler is not None:  # clip and step on unscaled gradients
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, False, False, result)

    def state_dict(self) -> dict:
        state = {"collector": self.collector.state_dict(), "overflow_steps": self.overflow_steps}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore the collector's state (refused on another rule, measure, mode or fixed
        tau: :meth:`GradientCollector.load_state_dict`), the counters and the scaler."""
        if isinstance(state, dict) and "average_stats" in state and self.average:
            # States saved before averaging was a backend held only its counters.
            state = {**state, "collector": {"stats": state["average_stats"],
                                            "threshold": self.collector.threshold.state_dict()}}
        if not isinstance(state, dict) or "collector" not in state:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a GAFTrainer state_dict (it needs 'collector'; got {keys})")
        self.collector.load_state_dict(state["collector"])
        self.overflow_steps = int(state.get("overflow_steps", 0))
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


# -- one-pass front ends ------------------------------------------------------------------------


class OnePassFilter(GradientCollector):
    """A :class:`~gaf.collector.GradientCollector` over the one-pass backend: M
    micro-gradients of ``model`` filtered from one forward and one backward
    (:mod:`gaf.micrograds.one_pass`).

    Args:
        model: the module; every module owning one of ``params`` must be supported.
        params: the parameters to filter (default: the model's trainable ones), or an
            optimizer's ``param_groups``.
        spec: the filter (its measure must be "cosine"); ``tau``, ``rule``,
            ``rule_options``, ``control`` as keyword sugar.
        keep_budget: how many micro-gradient numbers weight layers may keep for the
            direction instead of recomputing it (default: P, one gradient's worth).
    """

    def __init__(self, model: nn.Module, params: Iterable | None = None,
                 spec: FilterSpec | None = None, *, keep_budget: int | None = None,
                 **filter_options):
        self.model = model
        super().__init__(
            model.parameters() if params is None else params, spec,
            backend=lambda flat, spec: OnePassBackend(model, flat, spec, keep_budget),
            **filter_options)

    @property
    def captures(self) -> list:
        return self.backend.captures

    def step(self, inputs: Tensor | Sequence[Tensor], targets: Tensor,
             loss_fn: Callable[[Tensor, Tensor], Tensor], num_micro_batches: int,
             scale: Callable[[Tensor], Tensor] | None = None,
             autocast: Callable[[], object] = nullcontext) -> tuple[FilterResult, Tensor]:
        """Forward, backward, decide, write ``.grad``. Returns (result, mean micro loss).

        ``scale`` (e.g. ``GradScaler.scale``) is applied to L before the backward.
        """
        loss = self.collect_batch(self.model, loss_fn, inputs, targets, num_micro_batches,
                                  scale=scale, autocast=autocast)
        return self.finish(), loss

    def micro_gradients(self, inputs: Tensor | Sequence[Tensor], targets: Tensor,
                        loss_fn: Callable[[Tensor, Tensor], Tensor], num_micro_batches: int,
                        out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(rows [M, P], micro losses [M]) from one pass; see
        :meth:`gaf.micrograds.OnePassBackend.micro_gradients`."""
        return self.backend.micro_gradients(inputs, targets, loss_fn, num_micro_batches, out)


def collect_one_pass(collector: GradientCollector, model: nn.Module,
                     loss_fn: Callable[[Tensor, Tensor], Tensor],
                     inputs: Tensor | Sequence[Tensor], targets: Tensor,
                     num_micro_batches: int, engine: OnePassFilter | None = None) -> Tensor:
    """Hand ``collector`` the M micro-gradients of one pass, as M ``collect()`` calls would,
    for collectors that need the rows themselves (the distributed one: its Gram pairs rows of
    different ranks). Returns the micro-batch losses; call ``collector.finish()`` after."""
    engine = engine or OnePassFilter(model, collector.flat.params)
    rows, losses = engine.micro_gradients(inputs, targets, loss_fn, num_micro_batches)
    for row in rows:
        collector.flat.write(row)
        collector.collect()
    return losses


def one_pass_filter(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                    inputs: Tensor | Sequence[Tensor], targets: Tensor, num_micro_batches: int,
                    spec: FilterSpec | None = None, *, params: Iterable | None = None,
                    keep_budget: int | None = None, **filter_options) -> FilterResult:
    """GAF over ``num_micro_batches`` contiguous micro-batches from one forward/backward:
    writes the filtered direction into ``.grad`` of ``params`` (default: the model's trainable
    ones; ``None`` on a skip) and returns the :class:`~gaf.core.FilterResult` (``extra``:
    ``losses``, ``gram``). In a loop, keep one :class:`OnePassFilter`: it reuses its buffers."""
    engine = OnePassFilter(model, params, spec, keep_budget=keep_budget, **filter_options)
    result, _ = engine.step(inputs, targets, loss_fn, num_micro_batches)
    return result
