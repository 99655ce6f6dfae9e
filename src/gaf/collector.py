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

The collector holds a backend chosen at construction (:mod:`gaf.backends`: streaming,
stacked, or the distributed one of :mod:`gaf.distributed`); what is common to all of them
(the step's threshold, a control's verdicts, ``.grad`` on a skip, statistics and state)
lives here. See docs/design.md, "Front ends".

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

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
from torch import Tensor

from gaf.backends import StackedBackend, StreamingBackend
from gaf.controls import Control
from gaf.core import STREAMING_RULES, FilterResult, get_rule
from gaf.flat import FlatGradients
from gaf.measures import check_measure
from gaf.thresholds import Threshold, as_threshold

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


def choose_mode(mode: str, rule: str, measure: str) -> str:
    """The backend a rule and measure allow: "auto" streams where it can."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    # Other measures (gaf.measures) need every row at once: the streaming path computes
    # cosine against the running sum only.
    if mode == "streaming" and measure != "cosine":
        raise ValueError(
            f"measure {measure!r} needs every micro-gradient at once; use mode='stacked' "
            "(streaming supports the cosine measure only)"
        )
    if mode == "auto":
        return "streaming" if rule in STREAMING_RULES and measure == "cosine" else "stacked"
    if mode == "streaming" and rule not in STREAMING_RULES:
        raise ValueError(
            f"rule {rule!r} needs every micro-gradient at once; use mode='stacked' "
            f"(streaming supports {', '.join(STREAMING_RULES)})"
        )
    return mode


class GradientCollector:
    """Collect micro-gradients from ``.grad`` and write back their filtered combination.

    Args:
        params: the parameters the optimizer updates (or its ``param_groups``).
        tau: cosine-distance threshold in [0, 2], or a :class:`gaf.thresholds.Threshold`.
        rule: a name in :data:`gaf.core.RULES` ("mean", the paper's, by default).
        mode: "auto", "streaming" or "stacked" (see the module docstring).
        num_micro_batches: expected M, if known: the stacked buffer is sized for it once
            instead of growing by doubling. Needed with a control in streaming mode.
        measure: agreement measure, "cosine" (default), "sign" or "layerwise"
            (:mod:`gaf.measures`); the latter two use the stacked mode. With "layerwise"
            the tensors are this collector's parameters.
        control: a blind control (:mod:`gaf.controls`) whose verdicts replace the rule's
            test ``distance <= tau``; ``None`` (default) filters by agreement.
        rule_options: keyword options of the rule (:mod:`gaf.core.registry`).
        backend: ``backend(flat) -> backend``, building the collector's backend from its
            :class:`~gaf.flat.FlatGradients` (the distributed collector passes one); then
            ``mode`` is ignored.
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
        rule_options: Mapping | None = None,
        backend=None,
    ):
        entry = get_rule(rule)
        self.rule = entry.name
        self.rule_options = entry.options(rule_options)
        self.measure = check_measure(measure)
        self.flat = FlatGradients(params)
        if backend is None:
            mode = choose_mode(mode, self.rule, self.measure)
            if mode == "streaming":
                backend = StreamingBackend(self.flat, self.rule, entry.halving)
            else:
                backend = StackedBackend(self.flat, self.rule, self.measure,
                                         num_micro_batches, self.rule_options)
        else:
            backend = backend(self.flat)
        self.backend = backend
        self.mode = backend.mode
        if control is not None and not isinstance(control, Control):
            raise TypeError(
                f"control must have draw(num_rows), state_dict() and load_state_dict() "
                f"(see gaf.controls), got {type(control).__name__}"
            )
        if control is not None and self.mode == "streaming" and not num_micro_batches:
            raise ValueError(
                "a control in streaming mode needs num_micro_batches= (its verdicts are "
                "drawn before the step's micro-gradients arrive)"
            )
        self.control = control
        self._expected = num_micro_batches
        self.threshold = as_threshold(tau)
        self.stats = FilterStats()
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
        return self.backend.world_size

    @property
    def params(self) -> list[Tensor]:
        """The trainable parameters whose ``.grad`` the collector reads and writes."""
        return self.flat.params

    @property
    def device_side(self) -> bool:
        """Streaming: whether the accept test runs on the device (no host sync)."""
        return getattr(self.backend, "device_side", False)

    @device_side.setter
    def device_side(self, value: bool) -> None:
        if hasattr(self.backend, "device_side"):
            self.backend.device_side = bool(value)

    def begin(self) -> None:
        """Start a step: point every ``.grad`` at a zeroed buffer of the collector.

        Optional (``collect()`` also copies gradients that live elsewhere), but it lets the
        first micro-batch's backward accumulate straight into the collector's buffer, with
        no fresh allocation and no copy. Whatever ``.grad`` held before is dropped.
        """
        if self._count:
            raise RuntimeError("begin() called in the middle of a step (after collect())")
        target = self.backend.begin()
        target.zero_()
        self.flat.bind(target)

    def collect(self) -> None:
        """Take the micro-gradient now in ``.grad`` and prepare ``.grad`` for the next one."""
        if self._count == 0 and self.control is not None and self._expected:
            self._draw_verdicts(self._expected)
        verdict = None if self._verdicts is None else bool(self._verdicts[self._count])
        self.backend.collect(self._count, verdict)
        self._count += 1

    def finish(self) -> FilterResult:
        """Filter the collected micro-gradients and write the result into ``.grad``.

        If the step is skipped, every ``.grad`` is set to ``None``.
        """
        if self._count == 0:
            raise RuntimeError("finish() called before any collect(): no micro-gradients")
        if self.control is not None:
            if self._verdicts is None:
                self._draw_verdicts(self._count)
            rows = self._count * self.world_size
            if len(self._verdicts) != rows:
                raise ValueError(
                    f"the control drew verdicts for {len(self._verdicts)} rows but this step "
                    f"has {rows}: collect num_micro_batches={self._expected} "
                    "micro-batches per step"
                )
        result = self.backend.finish(self._count, self._step_tau, self._verdicts)
        self.stats.update(result)
        self.threshold.observe(result)
        if result.skipped:
            self.flat.clear()
        else:
            self.flat.write(result.grad, cache=result.grad is self.backend.output.tensor)
        self._reset_step()
        return result

    def signal_overflow(self) -> None:
        """Write inf into every ``.grad``, so that a GradScaler sees an overflow."""
        self.flat.write(self.flat.new_buffer().fill_(float("inf")))

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
        state.update(getattr(self.backend, "state", dict)())
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
        self.backend.start_step(self._step_tau)

    # -- the step's state -------------------------------------------------------------------

    def _draw_verdicts(self, micro_batches: int) -> None:
        """The control's verdicts for this step's rows, drawn once per step."""
        self._verdicts = np.asarray(self.control.draw(micro_batches * self.world_size),
                                    dtype=bool)

    def _reset_step(self) -> None:
        self._count = 0
        self._verdicts: np.ndarray | None = None
        self._step_tau = self.threshold.value()
        self.backend.start_step(self._step_tau)
