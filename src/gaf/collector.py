"""GAF on one device, used like gradient accumulation.

Usage::

    collector = gaf.GradientCollector(model.parameters(), tau=0.97)
    for x, y in micro_batches:
        loss_fn(model(x), y).backward()
        collector.collect()              # takes the micro-gradient out of .grad
    result = collector.finish()          # writes the filtered direction into .grad
    if not result.skipped:
        optimizer.step()
    optimizer.zero_grad()

Two modes:

``"streaming"`` (rules "mean" and "halving"): keeps one running sum ``s`` on the device and
    tests each micro-gradient against it as it arrives; extra memory is O(P), independent
    of M. The accept/reject test runs on the device (``torch.where``), so there is no host
    synchronisation until :meth:`finish`.
``"stacked"`` (every rule): keeps all M micro-gradients as rows of an [M, P] buffer and
    decides from their Gram matrix with :func:`gaf.core.decide`. Extra memory O(M·P).

``mode="auto"`` picks streaming where the rule allows it. Both modes make the same
decisions (tests check this in float64).

:meth:`finish` writes the direction into a buffer the collector reuses: ``result.grad``
(and the ``.grad`` views of it) stay valid until the next step starts (its first
:meth:`collect` or :meth:`begin`); clone it to keep it longer. :meth:`begin` (optional)
points ``.grad`` at a zeroed buffer before the first
micro-batch, so that no backward allocates or copies.

:meth:`finish` performs exactly one device→host transfer (the small vector of per-row
statistics), because whether the optimizer may step is a host-side decision. After it,
every statistic in the returned :class:`~gaf.core.FilterResult` lives on the host.

Semantics:

* A skipped step leaves every ``.grad`` as ``None``: a stray ``optimizer.step()`` then
  does nothing, and no stale gradient leaks into the next step.
* Frozen parameters are ignored; parameters that get no gradient in a micro-batch count
  as zero.
* Non-finite or zero micro-gradients are rejected and counted (``num_invalid``,
  ``num_nonfinite``); they never reach the update.
* Running counters are in :attr:`stats`; ``state_dict()`` holds them and the threshold's
  state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from gaf.controls import Control
from gaf.core import (
    Decision,
    FilterResult,
    check_rule,
    distance_from_products,
    filter_gradients,
    gram_dtype,
    result_from_decision,
)
from gaf.flat import FlatGradients
from gaf.measures import check_measure
from gaf.thresholds import Threshold, as_threshold

STREAMING_RULES = ("mean", "halving")
MODES = ("auto", "streaming", "stacked")


@dataclass
class FilterStats:
    """Running counters over filtered steps (host integers: no device sync to read)."""

    steps: int = 0
    skipped_steps: int = 0
    micro_batches: int = 0
    accepted: int = 0
    invalid: int = 0
    nonfinite: int = 0

    def update(self, result: FilterResult) -> None:
        self.steps += 1
        self.skipped_steps += int(result.skipped)
        self.micro_batches += result.num_micro_batches
        self.accepted += result.num_accepted
        self.invalid += result.num_invalid
        self.nonfinite += result.num_nonfinite

    @property
    def skip_rate(self) -> float:
        return self.skipped_steps / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.micro_batches if self.micro_batches else 0.0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if not hasattr(self, key):
                raise KeyError(f"unknown FilterStats field {key!r}")
            setattr(self, key, int(value))


def _halving_weights(accepted: np.ndarray) -> np.ndarray:
    """Weights of the halving rule from its accepted sequence (first accepted is the anchor)."""
    weights = np.zeros(len(accepted))
    first = True
    for k, ok in enumerate(accepted):
        if not ok:
            continue
        if first:
            weights[k], first = 1.0, False
        else:
            weights *= 0.5
            weights[k] = 0.5
    return weights


class GradientCollector:
    """Collect micro-gradients from ``.grad`` and write back their filtered combination.

    Args:
        params: the parameters the optimizer updates (or its ``param_groups``).
        tau: cosine-distance threshold in [0, 2], or a :class:`gaf.thresholds.Threshold`.
        rule: "mean" (the paper's), "halving", "anchor" or "neighbours".
        mode: "auto", "streaming" or "stacked" (see the module docstring).
        measure: agreement measure, "cosine" (default), "sign" or "layerwise"
            (:mod:`gaf.measures`); the latter two use the stacked mode. With "layerwise"
            the tensors are this collector's parameters.
        num_micro_batches: expected M, if known: the stacked buffer is sized for it once
            instead of growing by doubling. Needed with a control in streaming mode.
        control: a blind control (:mod:`gaf.controls`) whose verdicts replace the rule's
            test ``distance <= tau``; ``None`` (default) filters by agreement.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        tau: float | Threshold = 0.97,
        rule: str = "mean",
        mode: str = "auto",
        num_micro_batches: int | None = None,
        measure: str = "cosine",
        control: Control | None = None,
    ):
        self.rule = check_rule(rule)
        # Other measures (gaf.measures) need every row at once: the streaming path computes
        # cosine against the running sum only.
        self.measure = check_measure(measure)
        if mode == "auto" and self.measure != "cosine":
            mode = "stacked"
        if mode == "streaming" and self.measure != "cosine":
            raise ValueError(
                f"measure {measure!r} needs every micro-gradient at once; use mode='stacked' "
                "(streaming supports the cosine measure only)"
            )
        self._capacity_hint = num_micro_batches
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode == "auto":
            mode = "streaming" if rule in STREAMING_RULES else "stacked"
        if mode == "streaming" and rule not in STREAMING_RULES:
            raise ValueError(
                f"rule {rule!r} needs every micro-gradient at once; use mode='stacked' "
                f"(streaming supports {', '.join(STREAMING_RULES)})"
            )
        self.mode = mode
        if control is not None and not isinstance(control, Control):
            raise TypeError(
                f"control must have draw(num_rows), state_dict() and load_state_dict() "
                f"(see gaf.controls), got {type(control).__name__}"
            )
        if control is not None and mode == "streaming" and not num_micro_batches:
            raise ValueError(
                "a control in streaming mode needs num_micro_batches= (its verdicts are "
                "drawn before the step's micro-gradients arrive)"
            )
        self.control = control
        self.threshold = as_threshold(tau)
        self.flat = FlatGradients(params)
        # Streaming decisions stay on the device (no host sync per micro-batch) except on
        # the CPU, where a sync is free and branching avoids a full-size torch.where.
        self.device_side = self.flat.device.type != "cpu"
        self.stats = FilterStats()
        self._rows: Tensor | None = None  # stacked: [capacity, P]
        self._current: Tensor | None = None  # streaming: the micro-gradient being filled
        self._sum: Tensor | None = None  # streaming: running direction s
        self._out: Tensor | None = None  # the filtered direction, reused across steps
        self._reset_step()

    # -- public interface -------------------------------------------------------------

    @property
    def num_collected(self) -> int:
        return self._count

    @property
    def tau(self) -> float:
        return self.threshold.value()

    @property
    def world_size(self) -> int:
        """Processes whose micro-gradients one decision covers (1 on one device)."""
        return 1

    def begin(self) -> None:
        """Start a step: point every ``.grad`` at a zeroed buffer of the collector.

        Optional (``collect()`` also copies gradients that live elsewhere), but it lets the
        first micro-batch's backward accumulate straight into the collector's buffer, with
        no fresh allocation and no copy. Whatever ``.grad`` held before is dropped.
        """
        if self._count:
            raise RuntimeError("begin() called in the middle of a step (after collect())")
        if self.mode == "streaming":
            if self._current is None:
                self._allocate_streaming()
            target = self._current
        else:
            if self._rows is None:
                self._grow(1)
            target = self._rows[0]
        target.zero_()
        self.flat.bind(target)

    def collect(self) -> None:
        """Take the micro-gradient now in ``.grad`` and prepare ``.grad`` for the next one."""
        if self._count == 0 and self.control is not None and self._capacity_hint:
            self._draw_verdicts(self._capacity_hint)
        if self.mode == "streaming":
            self._collect_streaming()
        else:
            self._collect_stacked()
        self._count += 1

    def finish(self) -> FilterResult:
        """Filter the collected micro-gradients and write the result into ``.grad``.

        If the step is skipped, every ``.grad`` is set to ``None``.
        """
        if self._count == 0:
            raise RuntimeError("finish() called before any collect(): no micro-gradients")
        tau = self._step_tau
        if self.control is not None:
            if self._verdicts is None:
                self._draw_verdicts(self._count)
            rows = self._count * self.world_size
            if len(self._verdicts) != rows:
                raise ValueError(
                    f"the control drew verdicts for {len(self._verdicts)} rows but this step "
                    f"has {rows}: collect num_micro_batches={self._capacity_hint} "
                    "micro-batches per step"
                )
        if self.mode == "streaming":
            result = self._finish_streaming(tau)
        else:
            result = self._finish_stacked(tau)
        self.stats.update(result)
        self.threshold.observe(result)
        if result.skipped:
            self.flat.clear()
        else:
            self.flat.write(result.grad, cache=result.grad is self._out)
        self._reset_step()
        return result

    def state_dict(self) -> dict:
        state = {
            "stats": self.stats.state_dict(),
            "threshold": self.threshold.state_dict(),
            "rule": self.rule,
            "mode": self.mode,
            "measure": self.measure,
        }
        if self.control is not None:
            state["control"] = self.control.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("rule", self.rule) != self.rule:
            raise ValueError(f"state was saved with rule {state['rule']!r}, not {self.rule!r}")
        if state.get("measure", "cosine") != self.measure:
            raise ValueError(
                f"state was saved with measure {state['measure']!r}, not {self.measure!r}"
            )
        self.stats.load_state_dict(state["stats"])
        self.threshold.load_state_dict(state["threshold"])
        if self.control is not None and "control" in state:
            self.control.load_state_dict(state["control"])
        self._step_tau = self.threshold.value()  # the next step tests the restored tau

    def _draw_verdicts(self, micro_batches: int) -> None:
        """The control's verdicts for this step's rows, drawn once per step."""
        self._verdicts = np.asarray(self.control.draw(micro_batches * self.world_size),
                                    dtype=bool)

    # -- streaming ------------------------------------------------------------------------

    def _reset_step(self) -> None:
        self._count = 0
        self._verdicts: np.ndarray | None = None
        self._step_tau = self.threshold.value()
        # Per collected row: (accepted, distance, finite, valid), as host floats or as a
        # device tensor [4] (device-side path), moved to the host once in finish().
        self._stream_stats: list = []
        self._host_sum_sq = 0.0
        self._host_have_anchor = False
        if self.mode == "streaming" and self._sum is not None and self.device_side:
            # The device path adds the anchor to s; the host path copies it (no zeroing).
            self._sum.zero_()
            self._sum_sq.zero_()
            self._have_anchor.zero_()

    def _allocate_streaming(self) -> None:
        flat = self.flat
        self._current = flat.new_buffer()
        self._sum = flat.new_buffer()
        acc = gram_dtype(flat.dtype)
        self._sum_sq = torch.zeros((), dtype=acc, device=flat.device)
        self._have_anchor = torch.zeros((), dtype=torch.bool, device=flat.device)

    def _output_buffer(self) -> Tensor:
        """The buffer a step's direction is written to, reused across steps: a fresh P-sized
        allocation every step costs page faults on the CPU and allocator work elsewhere."""
        if self._out is None:
            self._out = self.flat.new_buffer()
        return self._out

    def _collect_streaming(self) -> None:
        flat = self.flat
        if self._current is None:
            self._allocate_streaming()
        g = flat.gather(self._current)
        acc = self._sum_sq.dtype
        # Products in the Gram dtype (float64 for half precision) so that streaming and
        # stacked see the same numbers.
        g_acc = g if g.dtype == acc else g.to(acc)
        if self.device_side:
            self._stream_on_device(g, g_acc)
        else:
            self._stream_on_host(g, g_acc)
        # The next backward accumulates into a zeroed buffer bound to .grad.
        g.zero_()
        flat.bind(g)

    def _stream_on_host(self, g: Tensor, g_acc: Tensor) -> None:
        """CPU: reading a scalar costs nothing, so decide in Python floats and branch;
        a handful of scalar tensor ops and a P-sized torch.where would cost more."""
        s = self._sum
        norm_sq_g = float(g_acc @ g_acc)
        finite = math.isfinite(norm_sq_g)
        valid = finite and norm_sq_g > 0
        if not valid:
            self._stream_stats.append((0.0, 2.0, float(finite), 0.0))
            return
        if not self._host_have_anchor:
            s.copy_(g)
            self._host_sum_sq, self._host_have_anchor = norm_sq_g, True
            self._stream_stats.append((1.0, 0.0, 1.0, 1.0))
            return
        s_acc = s if s.dtype == g_acc.dtype else s.to(g_acc.dtype)
        dot = float(s_acc @ g_acc)
        dist = distance_from_products(dot, self._host_sum_sq, norm_sq_g)
        if self._verdicts is not None:
            accept = bool(self._verdicts[self._count])
        else:
            accept = dist <= self._step_tau
        if accept:
            grown = self._host_sum_sq + 2 * dot + norm_sq_g
            if self.rule == "halving":
                s.mul_(0.5).add_(g, alpha=0.5)
                grown /= 4
            else:
                s.add_(g)
            self._host_sum_sq = grown
        self._stream_stats.append((float(accept), dist, 1.0, 1.0))

    def _stream_on_device(self, g: Tensor, g_acc: Tensor) -> None:
        """Accelerators: the accept/reject test stays on the device, no host sync."""
        s = self._sum
        acc = g_acc.dtype
        s_acc = s if s.dtype == acc else s.to(acc)
        norm_sq_g = g_acc @ g_acc
        dot = s_acc @ g_acc
        valid = torch.isfinite(norm_sq_g) & (norm_sq_g > 0)
        denom = self._sum_sq * norm_sq_g
        safe = torch.where(denom > 0, denom, torch.ones_like(denom))
        # A zero running sum agrees with nothing (cos = -1, D = 2), as in the core.
        cos = torch.where(denom > 0, dot / torch.sqrt(safe), -torch.ones_like(denom))
        dist = torch.clamp(1.0 - cos, 0.0, 2.0)
        anchor = valid & ~self._have_anchor
        if self._verdicts is not None:  # a host bool: no sync
            accept = valid if self._verdicts[self._count] else valid & anchor
        else:
            accept = valid & (anchor | (dist <= self._step_tau))
        dist = torch.where(anchor, torch.zeros_like(dist), dist)
        dist = torch.where(valid, dist, torch.full_like(dist, 2.0))
        # Anchor: s ← g. Later acceptances: s ← s + g ("mean") or (s + g) / 2 ("halving"),
        # i.e. s ← a·s + b·g. Rejected rows are dropped with torch.where, never
        # multiplied by zero (0 · inf = NaN).
        if self.rule == "halving":
            a = torch.where(anchor, 0.0, 0.5).to(acc)
            b = torch.where(anchor, 1.0, 0.5).to(acc)
            s.copy_(torch.where(accept, a.to(s.dtype) * s + b.to(s.dtype) * g, s))
            grown = a * a * self._sum_sq + 2 * a * b * dot + b * b * norm_sq_g
        else:
            s.add_(torch.where(accept, g, torch.zeros((), dtype=g.dtype, device=g.device)))
            grown = self._sum_sq + 2 * dot + norm_sq_g
        self._sum_sq.copy_(torch.where(accept, grown, self._sum_sq))
        self._have_anchor |= valid
        finite = torch.isfinite(norm_sq_g)
        self._stream_stats.append(torch.stack([accept.to(acc), dist.to(acc), finite.to(acc),
                                               valid.to(acc)]))

    def _finish_streaming(self, tau: float) -> FilterResult:
        if self.device_side:
            # The single device→host transfer of the step.
            host = torch.stack(self._stream_stats).cpu().double().numpy()
        else:
            host = np.asarray(self._stream_stats, dtype=np.float64)
        accepted = host[:, 0] > 0.5
        distances = host[:, 1].copy()
        finite, valid = host[:, 2] > 0.5, host[:, 3] > 0.5
        count = int(accepted.sum())
        # The running sum becomes the result in place, and the previous result buffer
        # becomes the next step's running sum: no copy of P numbers per step.
        grad, self._sum = self._sum, self._output_buffer()
        self._out = grad
        if count == 0:
            grad.zero_()  # nothing was accepted; the buffer may hold an older step's sum
        if self.rule == "halving":
            weights = _halving_weights(accepted)
        else:
            weights = accepted / max(count, 1)
            grad.div_(max(count, 1))
        anchor = int(np.argmax(accepted)) if count else -1
        decision = Decision(accepted, weights, distances, anchor, valid, finite)
        return result_from_decision(decision, grad, tau, self.rule)

    # -- stacked ---------------------------------------------------------------------------

    def _collect_stacked(self) -> None:
        k = self._count
        if self._rows is None or k + 1 >= self._rows.shape[0]:
            self._grow(k + 2)
        self.flat.gather(self._rows[k])
        self._rows[k + 1].zero_()
        self.flat.bind(self._rows[k + 1])

    def _grow(self, needed: int) -> None:
        # Row k + 1 receives the next backward, so M micro-batches need M + 1 rows.
        first = (self._capacity_hint or 3) + 1
        capacity = max(needed, first if self._rows is None else 2 * self._rows.shape[0])
        rows = self.flat.new_buffer(capacity)
        self.flat.forget_views()  # cached views would keep the old buffer alive
        if self._rows is not None:
            rows[: self._count].copy_(self._rows[: self._count])
            # .grad may be bound to the old buffer's row k: gather() copies it over.
        self._rows = rows

    def _finish_stacked(self, tau: float) -> FilterResult:
        return self.filter_rows(self._rows[: self._count], tau)

    def filter_rows(self, rows: Tensor, tau: float) -> FilterResult:
        """Filter the step's stacked micro-gradients ``rows`` [m, P] at threshold ``tau``.

        The extension point of the stacked mode: the distributed collector overrides it to
        decide over the rows of every rank. Must return a result whose ``grad`` is [P].
        """
        return filter_gradients(rows, tau, self.rule, self.measure, self.flat.numels,
                                out=self._output_buffer(), verdicts=self._verdicts)
