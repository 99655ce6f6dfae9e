"""What the DDP hook and the FSDP2 reduce-scatter share: one decision per backward (on the
all-reduced N x N Gram: the same bits, so the same branch, on every rank), its record, and
the optimizer guard that honours a skipped step (nothing inside backward can stop the
``optimizer.step()`` that follows: :meth:`GAFStepState.wrap_optimizer`).
"""

from __future__ import annotations

import datetime
import types

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from gaf.core import Decision, FilterResult, FilterStats, decide, result_from_decision
from gaf.distributed.comm import Comm, GAFDistributedError
from gaf.distributed.settings_check import check_settings, step_fields
from gaf.spec import FilterSpec, resolve_spec

Timeout = float | datetime.timedelta | None


class GAFStepState:
    """The filter spec, the communicator and the outcome of the latest GAF decision.

    Args:
        spec: a :class:`gaf.FilterSpec` (or build one from ``tau``, ``rule``,
            ``rule_options``, ``control``); the measure must be "cosine".
        process_group: the group to filter over (default: the default group).
        timeout: seconds any collective may take before :class:`GAFDistributedError`.
    """

    def __init__(self, spec: FilterSpec | None = None, *, tau=0.97, rule: str = "mean",
                 rule_options=None, measure: str = "cosine", control=None,
                 process_group=None, timeout: Timeout = None):
        self.spec = resolve_spec(spec, tau=tau, rule=rule, rule_options=rule_options,
                                 measure=measure, control=control)
        if self.spec.measure != "cosine":
            raise ValueError(
                f"measure {self.spec.measure!r} is not available inside DDP/FSDP: the hook "
                "exchanges the Gram matrix of the cosine measure only"
            )
        self.threshold = self.spec.threshold  # one object: an adaptive threshold keeps state
        self.process_group = process_group
        self.timeout = timeout
        self.stats = FilterStats()
        self.result: FilterResult | None = None
        self._pending: str | None = None  # "skip" / "take": the decision the guard consumes
        self._comm: Comm | None = None
        self._checked: tuple | None = None

    # -- outcome ----------------------------------------------------------------------------

    @property
    def skipped(self) -> bool:
        """Whether the latest step must not be applied (no agreement, or a non-finite
        rank gradient signalled as an overflow)."""
        return self.result is not None and (self.result.skipped
                                            or bool(self.result.extra.get("overflow")))

    def comm(self, group=None) -> Comm:
        group = self.process_group if group is None else group
        if self._comm is None or self._comm.group is not group:
            self._comm = Comm(group, self.timeout)
            if self._comm.size < 2:
                raise GAFDistributedError(
                    "GAF inside DDP/FSDP needs at least 2 ranks: with one rank there is one "
                    "gradient and nothing to compare (use gaf.GAFTrainer on one process)"
                )
        return self._comm

    # -- the decision -----------------------------------------------------------------------

    def check_ranks(self, comm: Comm, numel: int, dtype: torch.dtype, layout, device) -> None:
        """Compare the spec and the gradient layout across ranks once per layout (a tiny
        all-gather): ranks that disagree fail together instead of exchanging garbage."""
        key = (numel, dtype, tuple(map(tuple, layout)))
        if self._checked == key:
            return
        tau = self.threshold.value()
        check_settings(comm, step_fields(numel, 1, dtype, self.spec.rule, tau, "sharded",
                                          layout, self.spec.rule_options),
                        device, "the GAF hook's first exchange")
        self._checked = key

    def decide(self, comm: Comm, gram: Tensor) -> tuple[Decision, float, Tensor]:
        """All-reduce the partial Gram matrices and decide (same bits on every rank)."""
        comm.run("all_reduce of the partial Gram matrices", dist.all_reduce, gram)
        tau = self.threshold.value()
        verdicts = None
        if self.spec.control is not None:
            verdicts = np.asarray(self.spec.control.draw(comm.size), dtype=bool)
        gram = gram.to("cpu", torch.float64)  # one host copy: the decision and the result's
        decision = decide(gram, tau, self.spec.rule, verdicts, self.spec.rule_options)
        return decision, tau, gram

    def record(self, decision: Decision, tau: float, comm: Comm, direction: Tensor,
               **extra) -> FilterResult:
        """Keep the step's :class:`~gaf.core.FilterResult` (rows = ranks) and counters."""
        result = result_from_decision(decision, direction, tau, self.spec.rule)
        result.extra.update(world_size=comm.size, rank=comm.rank, rows_per_rank=1,
                            local_rows=slice(comm.rank, comm.rank + 1), **extra)
        self.stats.update(result)
        self.threshold.observe(result)
        self.result = result
        self._pending = "skip" if self.skipped else "take"
        return result

    # -- the optimizer guard ----------------------------------------------------------------

    def wrap_optimizer(self, optimizer, on_step=None):
        """Make ``optimizer.step()`` honour GAF's decision; returns the same optimizer::

            optimizer = state.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))

        After a skipped decision ``step()`` does nothing (returns the closure's loss); after a
        taken one, or with no decision since the last step (accumulation micro-steps), it steps.
        ``on_step(skipped)`` runs after each decided step (a framework's own skip flag)."""
        owner = getattr(optimizer, "_gaf_step_state", None)
        if owner is self:
            return optimizer
        if owner is not None:
            raise ValueError("this optimizer is already guarded by another GAF state")
        inner = optimizer.step
        state = self

        def step(opt, closure=None, *args, **kwargs):
            loss = None
            if closure is not None:
                # The closure's backward produces the decision (Lightning's automatic
                # optimization); the inner optimizer then steps without it.
                with torch.enable_grad():
                    loss = closure()
            pending, state._pending = state._pending, None
            if pending == "skip":
                if on_step is not None:
                    on_step(True)
                return loss
            result = inner(*args, **kwargs)
            if pending is not None and on_step is not None:
                on_step(False)
            return loss if closure is not None else result

        # A bound method, as torch's LR schedulers expect (they wrap ``step.__func__``).
        optimizer.step = types.MethodType(step, optimizer)
        optimizer._gaf_step_state = self
        return optimizer

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        state = {"stats": self.stats.state_dict(), "threshold": self.threshold.state_dict(),
                 "spec": self.spec.describe()}
        if self.spec.control is not None:
            state["control"] = self.spec.control.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.stats.load_state_dict(state["stats"])
        self.threshold.load_state_dict(state["threshold"])
        if self.spec.control is not None and "control" in state:
            self.spec.control.load_state_dict(state["control"])
