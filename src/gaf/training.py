"""One-call GAF training step on one device.

:class:`GAFTrainer` splits a batch into M micro-batches, runs forward and backward on
each, filters the micro-gradients with a :class:`~gaf.collector.GradientCollector`, and
steps the optimizer, or skips the step. Per step::

    for each micro-batch k:            (under torch.autocast if asked)
        loss_k = loss_fn(model(x_k), y_k)
        backward(scaler.scale(loss_k) if scaler else loss_k)
        collector.collect()
    result = collector.finish()        # filtered direction now in .grad
    if result.skipped:                 # fewer than 2 micro-gradients agree
        no optimizer.step(), no scaler.update(); StepResult.skipped is True
    else:
        scaler.unscale_(optimizer)     # with AMP: clip and step on unscaled gradients
        clip_grad_norm_(max_grad_norm) # clipping applies after filtering
        optimizer.step() / scaler.step(optimizer); scaler.update()
    optimizer.zero_grad(set_to_none=True)

Notes on AMP: cosine distance is scale-invariant, so filtering the scaled micro-gradients
decides exactly as filtering unscaled ones would. A micro-gradient that overflowed is
rejected by the filter; with a GradScaler the step is then handed to the scaler as an
overflow (the filtered gradient is poisoned with inf before ``scaler.step``), so the
scaler skips the step and lowers its scale, as it does without GAF. Without a scaler a
non-finite micro-gradient is simply rejected and counted.

Skipped steps are visible as ``StepResult.skipped`` (and ``trainer.stats``), so callers
can hold a learning-rate scheduler on skips.

``step(inputs, targets, on_micro_gradient=fn)`` calls ``fn(k)`` after micro-batch k's
backward and before the collector takes the gradient, while every ``param.grad`` holds
micro-gradient k (already scaled, under a GradScaler): the place to snapshot it, measure
it, or corrupt it (fault injection). Changes made to ``.grad`` in place there are what
the filter sees.

Plain averaging (``average=True``) shares the same forward/backward loop without a
filter: every ``.grad`` is cleared (set to None) before the first micro-batch, each
micro-batch's loss is divided by M and back-propagated into the same ``.grad``, then
clip and step as above (plain gradient accumulation, what data-parallel SGD computes).
``on_micro_gradient(k)`` then sees the *accumulated* gradient Σ_{i<=k} ∇loss_i / M. The
step's ``result`` reports every micro-batch accepted and the step taken; its ``grad`` is
empty (the gradient is in ``.grad``) and its ``distances`` are NaN (nothing measured).
With a GradScaler the scaler may still skip an overflowing step by itself, as it does
without GAF; ``StepResult.overflow`` does not report it (that would cost a host sync).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gaf.collector import FilterStats, GradientCollector
from gaf.controls import Control
from gaf.core import FilterResult
from gaf.flat import FlatGradients
from gaf.one_pass import OnePassFilter
from gaf.thresholds import Threshold

MICRO_GRADIENTS = ("sequential", "one-pass")


@dataclass
class StepResult:
    """What one :meth:`GAFTrainer.step` did. ``loss`` is a detached device tensor (mean of
    the micro-batch losses): reading it with ``.item()`` is the caller's choice of sync."""

    loss: Tensor
    skipped: bool
    overflow: bool
    result: FilterResult


def split_batch(batch: Tensor | Sequence[Tensor], num_micro_batches: int) -> list:
    """Split a tensor (or a tuple/list of tensors) into M micro-batches along dim 0."""
    if isinstance(batch, Tensor):
        n = batch.shape[0]
    elif isinstance(batch, (tuple, list)) and batch and all(isinstance(t, Tensor) for t in batch):
        n = batch[0].shape[0]
        if any(t.shape[0] != n for t in batch):
            raise ValueError("all tensors of a batch must have the same size along dim 0")
    else:
        raise TypeError("a batch must be a tensor or a tuple/list of tensors")
    if num_micro_batches > n:
        raise ValueError(
            f"cannot split a batch of {n} samples into {num_micro_batches} micro-batches"
        )
    if isinstance(batch, Tensor):
        return list(torch.tensor_split(batch, num_micro_batches))
    parts = [torch.tensor_split(t, num_micro_batches) for t in batch]
    return [type(batch)(p[k] for p in parts) for k in range(num_micro_batches)]


class GAFTrainer:
    """Drop-in GAF step for a model, any ``torch.optim`` optimizer and a loss function.

    Args:
        model: the module to train.
        optimizer: any ``torch.optim.Optimizer`` over (some of) the model's parameters.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (mean over the micro-batch).
        num_micro_batches: M, the number of micro-batches each batch is split into.
        tau, rule, mode, measure: as for :class:`~gaf.collector.GradientCollector`.
        max_grad_norm: clip the filtered gradient to this norm (None: no clipping).
        scaler: a ``torch.amp.GradScaler`` for mixed precision (None: no scaling).
        autocast_dtype: run forward passes under ``torch.autocast`` with this dtype.
        collector: a ready collector (e.g. a distributed one) to use instead of building
            one from ``tau``, ``rule``, ``mode``, ``measure`` and ``control``.
        control: a blind control (:mod:`gaf.controls`) deciding in place of agreement.
        rule_options: keyword options of the rule (:mod:`gaf.core.registry`).
        average: plain gradient averaging through the same loop, no filter (module
            docstring); ``tau``, ``rule``, ``mode``, ``measure``, ``control`` unused.
        micro_gradients: "sequential" (M forward/backward passes, the default) or
            "one-pass" (one forward and backward of the whole batch, same decisions and
            direction; see :mod:`gaf.one_pass` for the layers and losses it supports).

    One micro-batch per step on one device is refused: one micro-gradient can agree with
    no other, so every step would be skipped (distributed, m = 1 per rank is fine).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        num_micro_batches: int,
        tau: float | Threshold = 0.97,
        rule: str = "mean",
        mode: str = "auto",
        max_grad_norm: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        autocast_dtype: torch.dtype | None = None,
        measure: str = "cosine",
        collector: GradientCollector | None = None,
        control: Control | None = None,
        average: bool = False,
        micro_gradients: str = "sequential",
        rule_options: Mapping | None = None,
    ):
        if isinstance(num_micro_batches, bool) or not isinstance(num_micro_batches, int) \
                or num_micro_batches < 1:
            raise ValueError(f"num_micro_batches must be a positive int, got {num_micro_batches!r}")
        if average and (collector is not None or control is not None):
            raise ValueError("average=True filters nothing: it takes no collector or control")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.num_micro_batches = num_micro_batches
        self.max_grad_norm = max_grad_norm
        self.scaler = scaler
        self.autocast_dtype = autocast_dtype
        self.average = bool(average)
        if micro_gradients not in MICRO_GRADIENTS:
            raise ValueError(f"unknown micro_gradients {micro_gradients!r}; choose one of "
                             f"{', '.join(MICRO_GRADIENTS)}")
        self.micro_gradients = micro_gradients
        if micro_gradients == "one-pass":
            if collector is not None or mode != "auto" or measure != "cosine" or average \
                    or control is not None:
                raise ValueError("micro_gradients='one-pass' takes no collector, mode or "
                                 "measure (nor control or average): it filters by cosine from "
                                 "its own Gram matrix")
            collector = OnePassFilter(model, optimizer.param_groups, tau=tau, rule=rule)
        # The trainer's own view of the parameters (clipping, autocast's device, AMP overflow):
        # it uses a collector through its public interface only.
        self._flat = FlatGradients(optimizer.param_groups)
        if self.average:
            collector = None
            self._average_stats = FilterStats()
        elif collector is None:
            collector = GradientCollector(
                optimizer.param_groups, tau=tau, rule=rule, mode=mode,
                num_micro_batches=num_micro_batches, measure=measure, control=control,
                rule_options=rule_options,
            )
        self.collector = collector
        if collector is not None and num_micro_batches * getattr(collector, "world_size", 1) < 2:
            raise ValueError(
                "num_micro_batches=1 on one device: a single micro-gradient can agree "
                "with no other, so every step would be skipped; use M >= 2 (or "
                "average=True for plain steps)"
            )
        self.overflow_steps = 0

    @property
    def stats(self) -> FilterStats:
        return self._average_stats if self.average else self.collector.stats

    @property
    def params(self) -> list[Tensor]:
        """The trainable parameters the step updates (and clips), in the optimizer's order."""
        return self._flat.params

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self._flat.device.type, dtype=self.autocast_dtype)

    def _micro_batches(self, inputs, targets, on_micro_gradient, after_backward) -> Tensor:
        """Forward and backward of each micro-batch; returns the mean loss (detached)."""
        m = self.num_micro_batches
        micro_inputs = split_batch(inputs, m)
        micro_targets = split_batch(targets, m)
        total = None
        for k, (x, y) in enumerate(zip(micro_inputs, micro_targets, strict=True)):
            with self._autocast():
                out = self.model(*x) if isinstance(x, (tuple, list)) else self.model(x)
                loss = self.loss_fn(out, y)
            back = loss / m if self.average else loss
            (self.scaler.scale(back) if self.scaler is not None else back).backward()
            if on_micro_gradient is not None:
                on_micro_gradient(k)
            after_backward()
            total = loss.detach().float() if total is None else total + loss.detach().float()
        return total / m

    def _apply(self) -> None:
        """Unscale, clip and step on the gradient now in ``.grad``."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def step(self, inputs: Tensor | Sequence[Tensor], targets: Tensor,
             on_micro_gradient: Callable[[int], None] | None = None) -> StepResult:
        """One training step over ``inputs``/``targets`` split into M micro-batches.

        ``on_micro_gradient(k)``, if given, runs after micro-batch k's backward while
        ``.grad`` holds micro-gradient k (with ``average=True``: the accumulated gradient),
        before the collector takes it; see the module docstring.
        """
        ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        # A DDP model's own all-reduce must not run: it would average the micro-gradients
        # before the filter sees them (and move P values for nothing).
        with self.model.no_sync() if ddp and not self.average else nullcontext():
            return self._step(inputs, targets, on_micro_gradient)

    def _step(self, inputs, targets, on_micro_gradient) -> StepResult:
        if self.average:
            return self._average_step(inputs, targets, on_micro_gradient)
        if self.micro_gradients == "one-pass":
            if on_micro_gradient is not None:
                raise ValueError("on_micro_gradient needs micro_gradients='sequential': one "
                                 "pass never holds a micro-gradient in .grad")
            scale = self.scaler.scale if self.scaler is not None else None
            result, loss = self.collector.step(inputs, targets, self.loss_fn,
                                               self.num_micro_batches, scale, self._autocast)
            return self._filtered_step(result, loss)
        self.collector.begin()  # .grad → zeroed collector buffer: backward writes in place
        loss = self._micro_batches(inputs, targets, on_micro_gradient, self.collector.collect)
        return self._filtered_step(self.collector.finish(), loss)

    def _filtered_step(self, result: FilterResult, loss: Tensor) -> StepResult:
        """Step the optimizer on the filtered gradient now in ``.grad``, or skip."""
        overflow = self.scaler is not None and result.num_nonfinite > 0
        if overflow:
            self._step_scaler_overflow()
            return StepResult(loss, True, True, result)
        if result.skipped:
            return StepResult(loss, True, False, result)
        self._apply()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, False, False, result)

    def _average_step(self, inputs, targets, on_micro_gradient) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._micro_batches(inputs, targets, on_micro_gradient, _nothing)
        self._apply()
        m = self.num_micro_batches
        result = FilterResult(
            grad=torch.empty(0), accepted=torch.ones(m, dtype=torch.bool),
            distances=torch.full((m,), float("nan"), dtype=torch.float64),
            weights=torch.full((m,), 1.0 / m, dtype=torch.float64), anchor=0,
            num_invalid=0, tau=2.0, rule="average", valid=torch.ones(m, dtype=torch.bool),
        )
        self._average_stats.update(result)
        return StepResult(loss, False, False, result)

    def _step_scaler_overflow(self) -> None:
        """Let the GradScaler see the overflow it would have seen without GAF: it skips the
        step and lowers its scale."""
        self.overflow_steps += 1
        flat = self._flat
        poisoned = flat.new_buffer().fill_(float("inf"))
        flat.write(poisoned)
        self.scaler.step(self.optimizer)  # finds inf, does not call optimizer.step()
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        if self.average:
            state = {"average_stats": self._average_stats.state_dict()}
        else:
            state = {"collector": self.collector.state_dict()}
        state["overflow_steps"] = self.overflow_steps
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.average:
            self._average_stats.load_state_dict(state["average_stats"])
        else:
            self.collector.load_state_dict(state["collector"])
        self.overflow_steps = int(state.get("overflow_steps", 0))
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def _nothing() -> None:
    """The averaging path's stand-in for ``collector.collect``: .grad keeps accumulating."""
