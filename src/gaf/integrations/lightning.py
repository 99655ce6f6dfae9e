"""GAF for PyTorch Lightning (``lightning.pytorch``): a callback for automatic optimisation.

Usage::

    trainer = L.Trainer(accumulate_grad_batches=M, gradient_clip_val=1.0,
                        callbacks=[GAFCallback(tau=0.97)])
    trainer.fit(model, loader)          # loader yields micro-batches

Each batch of a window is one micro-gradient; at the window's last backward ``.grad`` =
M · (mean of the accepted ones), undoing Lightning's division by M. A skipped step runs no
``on_before_optimizer_step``, clipping, ``optimizer.step()`` or GradScaler update, and
"step"-interval LR schedulers are held. The skip needs the one place that runs the last
backward and then the step, the precision plugin's ``optimizer_step``: the callback wraps
it while fitting, so every precision plugin keeps its own behaviour. Under
``strategy="ddp"`` a no-op communication hook stops DDP's all-reduce and the decision
covers all N·M micro-gradients. Statistics go to ``self.log`` under ``gaf/``. Semantics and
pitfalls: docs/integrations.md.

Manual optimisation needs no callback: use a :class:`gaf.GradientCollector` in
``training_step``::

    def on_fit_start(self):                              # self.automatic_optimization = False
        self.collector = gaf.GradientCollector(self.optimizers().optimizer.param_groups, tau=0.97)

    def training_step(self, batch, batch_idx):           # one batch: M micro-batches
        opt = self.optimizers()
        for x, y in zip(*(t.chunk(M) for t in batch)):
            self.manual_backward(F.cross_entropy(self(x), y))
            self.collector.collect()
        result = self.collector.finish()
        if not result.skipped:
            self.clip_gradients(opt, gradient_clip_val=1.0)
            opt.step()
        opt.zero_grad()

(with 16-mixed a rejected overflow then does not lower the scaler's scale).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

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

__all__ = ["GAFCallback"]


class GAFCallback(Callback):
    """Gradient Agreement Filtering over Lightning's gradient accumulation.

    Args:
        spec: the filter (:class:`gaf.FilterSpec`); ``tau``, ``rule``, ``rule_options``,
            ``measure``, ``control`` as keyword sugar (under DDP the measure must be
            "cosine"). Checked here, at construction.
        mode: as for :class:`gaf.GradientCollector` ("stacked" under DDP).
        method: the distributed exchange, "sharded" or "allgather" (DDP only).
        hold_lr_schedulers: do not step ``interval="step"`` LR schedulers on skipped steps.
        log: send the step statistics to ``pl_module.log`` under ``log_prefix``.
        timeout: seconds a collective of the distributed exchange may take (DDP only).
    """

    def __init__(self, spec: FilterSpec | None = None, *, mode: str = "auto",
                 method: str = "sharded", hold_lr_schedulers: bool = True, log: bool = True,
                 log_prefix: str = "gaf/", timeout: float | None = None, **filter_options):
        self.spec = resolve_spec(spec, **filter_options)
        self.mode = mode
        self.method = method
        self.hold_lr_schedulers = hold_lr_schedulers
        self.log = log
        self.log_prefix = log_prefix
        self.timeout = timeout
        self.collector = None
        self.window: MicroGradientWindow | None = None
        self.overflow_steps = 0
        self.last_outcome: WindowOutcome | None = None
        self._pending: WindowOutcome | None = None
        self._to_log: WindowOutcome | None = None
        self._held: set[int] = set()
        self._step_schedulers: set[int] = set()
        self._loaded: dict = {}
        self._restore: list[tuple[Any, str, Any]] = []
        self._scaler = False

    @property
    def stats(self) -> FilterStats:
        """Running counters of the collector (steps, skipped steps, accepted micro-batches)."""
        if self.collector is None:
            raise RuntimeError("GAFCallback.stats is available once fitting has started")
        return self.collector.stats

    # -- set-up ---------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                "GAFCallback works with automatic optimisation; with manual optimisation use "
                "gaf.GradientCollector in training_step (see gaf.integrations.lightning)"
            )
        if len(trainer.optimizers) != 1:
            raise ValueError(
                "GAFCallback supports one optimizer, the module configured "
                f"{len(trainer.optimizers)}"
            )
        ddp = isinstance(trainer.strategy.model, torch.nn.parallel.DistributedDataParallel)
        if trainer.world_size > 1 and not ddp:
            raise ValueError(
                f"GAFCallback supports one device or DDP; strategy "
                f"{type(trainer.strategy).__name__} runs {trainer.world_size} processes otherwise"
            )
        m = trainer.accumulate_grad_batches
        if m * trainer.world_size < 2:
            raise ValueError(
                "GAF needs at least two micro-gradients per step: set accumulate_grad_batches "
                f"to 2 or more (got {m} on {trainer.world_size} process)"
            )
        optimizer = trainer.optimizers[0]
        self._pending = self._to_log = None
        self._held, self._step_schedulers = set(), set()
        if ddp:
            disable_ddp_allreduce(trainer.strategy.model)
        if self.collector is None:
            self.collector = build_collector(
                optimizer, self.spec, distributed=ddp, mode=self.mode, method=self.method,
                timeout=self.timeout, num_micro_batches=m,
            )
            if self._loaded:  # a checkpoint is restored before fitting starts
                self.collector.load_state_dict(self._loaded["collector"])
        self.window = MicroGradientWindow(self.collector, trainable_params(optimizer))
        plugin = trainer.strategy.precision_plugin
        self._scaler = getattr(plugin, "scaler", None) is not None
        self._patch(plugin, "optimizer_step", self._guard_optimizer_step(plugin.optimizer_step))
        if self.hold_lr_schedulers:
            for config in trainer.lr_scheduler_configs:
                if config.interval == "step":
                    scheduler = config.scheduler
                    self._step_schedulers.add(id(scheduler))
                    self._patch(scheduler, "step", self._guard_scheduler_step(scheduler))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unpatch()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unpatch()  # also after an exception, when on_fit_end does not run

    def _patch(self, obj: Any, name: str, replacement: Any) -> None:
        had_own = name in vars(obj)
        self._restore.append((obj, name, vars(obj)[name] if had_own else None))
        setattr(obj, name, replacement)

    def _unpatch(self) -> None:
        while self._restore:
            obj, name, previous = self._restore.pop()
            if previous is None:
                delattr(obj, name)
            else:
                setattr(obj, name, previous)

    # -- micro-gradients ------------------------------------------------------------------

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.window.before_backward()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning's own test for "this batch ends the window" (it decides the optimizer
        # step with it), so the window here and Lightning's always agree.
        last = not trainer.fit_loop._should_accumulate()
        outcome = self.window.after_backward(
            last=last, loss_divisor=trainer.accumulate_grad_batches, scaler=self._scaler
        )
        if outcome is not None:
            self._pending = outcome

    def _guard_optimizer_step(self, plugin_step):
        def optimizer_step(optimizer, model, closure, **kwargs):
            closure_result = closure()  # the window's last training_step and backward
            outcome, self._pending = self._pending, None
            if outcome is None:  # the last training_step returned None: Lightning ran no backward
                if self.collector.num_collected == 0:
                    return closure_result  # nor did any batch of the window: nothing to apply
                outcome = self.window.finish(loss_divisor=model.trainer.accumulate_grad_batches,
                                             scaler=self._scaler)
            self.last_outcome = self._to_log = outcome
            self.overflow_steps += int(outcome.overflow)
            if outcome.skipped:
                self._held = set(self._step_schedulers)
            if outcome.skipped and not outcome.overflow:
                return closure_result
            # Taken steps, and overflows (the GradScaler skips them and lowers its scale).
            return plugin_step(optimizer, model, lambda: closure_result, **kwargs)

        return optimizer_step

    def _guard_scheduler_step(self, scheduler):
        original = scheduler.step

        def step(*args, **kwargs):
            if id(scheduler) in self._held:
                self._held.discard(id(scheduler))
                return None
            return original(*args, **kwargs)

        return step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        outcome, self._to_log = self._to_log, None
        if outcome is None or not self.log:
            return
        row = step_statistics(outcome.result, self.collector.stats, outcome.overflow)
        row["overflow"] = float(outcome.overflow)
        prefix = self.log_prefix
        pl_module.log_dict({prefix + k: v for k, v in row.items()}, on_step=True,
                           on_epoch=False, batch_size=1)
        # Epoch means under their own names, synchronised once an epoch: every rank holds
        # the same values, so the mean over ranks changes nothing, and per-step
        # synchronisation would cost a collective per value and step.
        per_step = {k: v for k, v in row.items() if k not in ("skip_rate", "acceptance_rate")}
        pl_module.log_dict({f"{prefix}{k}_epoch": v for k, v in per_step.items()},
                           on_step=False, on_epoch=True, batch_size=1,
                           sync_dist=trainer.world_size > 1)

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        if self.collector is None:
            return {}
        return {"collector": self.collector.state_dict(), "overflow_steps": self.overflow_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self._loaded = state_dict
        if self.collector is not None and state_dict:
            self.collector.load_state_dict(state_dict["collector"])
        self.overflow_steps = int(state_dict.get("overflow_steps", 0))
