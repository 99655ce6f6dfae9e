"""GAF for loops written with Hugging Face accelerate's gradient accumulation::

    accelerator = Accelerator(gradient_accumulation_steps=M)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    gaf_step = GAFAccumulator(accelerator, model, optimizer, tau=0.97)
    for x, y in loader:                              # micro-batches
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model(x), y))
            gaf_step.after_backward()               # a micro-gradient; filters at the window's end
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)   # the filtered gradient
            optimizer.step()                         # does nothing on a skipped step
            scheduler.step()                         # accelerate holds it on skipped steps
            optimizer.zero_grad()

At the window's last micro-batch ``.grad`` = M · (mean of the accepted ones); a skipped
step sets accelerate's skip flag (``accelerator.optimizer_step_was_skipped``), which
prepared schedulers read. Under DDP a no-op communication hook stops DDP's all-reduce and
a :class:`gaf.distributed.DistributedGradientCollector` filters every rank's
micro-gradients. DeepSpeed and FSDP are not supported (docs/integrations.md).
"""

from __future__ import annotations

import functools

from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType
from torch import nn

from gaf.core import FilterStats
from gaf.integrations.common import (
    MicroGradientWindow,
    WindowOutcome,
    build_collector,
    disable_ddp_allreduce,
    step_statistics,
    trainable_params,
)
from gaf.spec import FilterSpec, resolve_spec

__all__ = ["GAFAccumulator"]

_SUPPORTED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


class GAFAccumulator:
    """Gradient Agreement Filtering for a loop over ``accelerator.accumulate``.

    Args:
        accelerator: the ``Accelerator``; its ``gradient_accumulation_steps`` is M.
        model: the prepared model (wrapped in DDP when several processes run).
        optimizer: the prepared ``AcceleratedOptimizer``; its ``step`` is replaced on this
            instance so that skipped steps never reach the optimizer.
        spec, mode: the filter (or its keyword sugar) and backend, as for
            :class:`gaf.GradientCollector` (several processes: measure "cosine", "stacked").
        method, timeout: of the distributed exchange (several processes only).
        num_micro_batches: micro-batches per step on each process (default:
            ``accelerator.gradient_accumulation_steps``)."""

    def __init__(self, accelerator: Accelerator, model: nn.Module, optimizer: AcceleratedOptimizer,
                 spec: FilterSpec | None = None, *, mode: str = "auto", method: str = "sharded",
                 timeout: float | None = None, num_micro_batches: int | None = None,
                 **filter_options):
        spec = resolve_spec(spec, **filter_options)
        if num_micro_batches is None:
            num_micro_batches = accelerator.gradient_accumulation_steps
        if not isinstance(optimizer, AcceleratedOptimizer):
            raise TypeError(
                "GAFAccumulator needs the optimizer returned by accelerator.prepare(), got "
                f"{type(optimizer).__name__}"
            )
        if accelerator.distributed_type not in _SUPPORTED:
            raise ValueError(
                f"GAFAccumulator supports one process or DDP, not {accelerator.distributed_type}"
            )
        distributed = accelerator.num_processes > 1
        if distributed:
            if not isinstance(model, nn.parallel.DistributedDataParallel):
                raise TypeError("with several processes, pass the model accelerator.prepare() "
                                "wrapped in DistributedDataParallel")
            disable_ddp_allreduce(model)
        elif num_micro_batches < 2:
            raise ValueError(
                "GAF needs at least two micro-gradients per step: create the Accelerator with "
                f"gradient_accumulation_steps >= 2 (got {num_micro_batches})"
            )
        self.accelerator = accelerator
        self.optimizer = optimizer
        self.collector = build_collector(
            optimizer.optimizer, spec, distributed=distributed, mode=mode, method=method,
            timeout=timeout, num_micro_batches=num_micro_batches,
        )
        self.window = MicroGradientWindow(self.collector, trainable_params(optimizer.optimizer))
        self.overflow_steps = 0
        self.last_outcome: WindowOutcome | None = None
        self._pending: WindowOutcome | None = None
        self._since_log: list[WindowOutcome] = []
        self._guard_step(optimizer)

    @property
    def stats(self) -> FilterStats:
        """Running counters of the collector (steps, skipped steps, accepted micro-batches)."""
        return self.collector.stats

    def before_backward(self) -> None:
        """Optional, before each backward: the window's first backward then accumulates
        straight into the collector's buffer (no copy)."""
        self.window.before_backward()

    def after_backward(self, loss_divisor: float | None = None) -> WindowOutcome | None:
        """Take the micro-gradient in ``.grad``; at the window's last micro-batch filter and
        return how the window ended (``None`` before). ``loss_divisor``: what each loss was
        divided by (default: ``gradient_accumulation_steps``, as ``accelerator.backward`` does)."""
        if loss_divisor is None:
            loss_divisor = self.accelerator.gradient_accumulation_steps
        outcome = self.window.after_backward(
            last=self.accelerator.sync_gradients, loss_divisor=loss_divisor,
            scaler=self.accelerator.scaler is not None,
        )
        if outcome is not None:
            self._pending = self.last_outcome = outcome
            self.overflow_steps += int(outcome.overflow)
            self._since_log.append(outcome)
        return outcome

    def log_row(self, prefix: str = "gaf/") -> dict[str, float]:
        """Means of the step statistics since the previous call (``skipped``: the skip rate
        over those steps) and the running ``skip_rate``; empty if no step ended since."""
        outcomes, self._since_log = self._since_log, []
        if not outcomes:
            return {}
        rows = [step_statistics(o.result, overflow=o.overflow) for o in outcomes]
        keys = sorted({k for row in rows for k in row})
        out = {}
        for key in keys:
            values = [row[key] for row in rows if key in row]
            out[prefix + key] = sum(values) / len(values)
        out[prefix + "skipped_steps"] = float(self.stats.skipped_steps)
        out[prefix + "skip_rate"] = float(self.stats.skip_rate)
        return out

    def state_dict(self) -> dict:
        """Counters and threshold state; ``accelerator.register_for_checkpointing(gaf_step)``
        puts them in ``accelerator.save_state()``."""
        return {"collector": self.collector.state_dict(), "overflow_steps": self.overflow_steps}

    def load_state_dict(self, state: dict) -> None:
        self.collector.load_state_dict(state["collector"])
        self.overflow_steps = int(state.get("overflow_steps", 0))

    def _guard_step(self, optimizer: AcceleratedOptimizer) -> None:
        original = optimizer.step

        # wraps() keeps the marker an LR scheduler built earlier left on step() (the HF
        # Trainer builds its scheduler before the first micro-batch): without it torch warns
        # that step() "has been overridden after learning rate scheduler initialization".
        # The scheduler's wrapper still runs on every taken step; skipped steps hold it.
        @functools.wraps(original)
        def step(closure=None):
            if not optimizer.gradient_state.sync_gradients:
                return original(closure)  # mid-window: accelerate's own no-op
            outcome, self._pending = self._pending, None
            if outcome is None:
                raise RuntimeError(
                    "optimizer.step() ends an accumulation window, but GAF saw no micro-batch "
                    "end it: call after_backward() after every accelerator.backward()"
                )
            if outcome.skipped and not outcome.overflow:
                # accelerate's own skip flag (the one a GradScaler overflow sets) is what
                # accelerator.optimizer_step_was_skipped and prepared schedulers read.
                optimizer._is_overflow = True
                return None
            result = original(closure)
            if self.accelerator.scaler is None:
                optimizer._is_overflow = False
            return result

        optimizer.step = step
