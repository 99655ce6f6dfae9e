"""GAF on one device, used like gradient accumulation::

    collector = gaf.GradientCollector(model.parameters(), tau=0.97)
    for x, y in micro_batches:
        loss_fn(model(x), y).backward()
        collector.collect()              # takes the micro-gradient out of .grad
    result = collector.finish()          # writes the filtered direction into .grad
    if not result.skipped:
        optimizer.step()

The collector holds one backend (:mod:`gaf.micrograds`: "streaming", one running sum,
O(P) memory, rules mean/halving; "stacked", an [M, P] buffer decided from its Gram matrix,
every rule; one-pass; averaging; or the distributed one) behind the
:class:`~gaf.micrograds.Backend` interface. What is common to all lives here: the spec,
the control's verdicts, writing ``.grad`` (the one place that does), AMP overflow,
statistics and state (docs/design.md, "Front ends"; docs/guide.md, "Training semantics").

:meth:`finish` makes one device→host transfer (the per-row statistics) and writes the
direction into a reused buffer, valid until the next step's first :meth:`collect` or
:meth:`begin`. A skipped step leaves every ``.grad`` as ``None``. Frozen parameters are
ignored; a parameter with no gradient counts as zero; non-finite or zero micro-gradients
are rejected and counted; ``collect()`` with no backward since the last one is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch import Tensor, nn

from gaf.core import FilterResult, FilterStats
from gaf.micrograds import (
    AveragingBackend,
    Backend,
    BatchPass,
    FlatGradients,
    StackedBackend,
    StreamingBackend,
)
from gaf.noise_scale import NoiseScale
from gaf.spec import FilterSpec, resolve_spec

MODES = ("auto", "streaming", "stacked", "average")

BackendFactory = Callable[[FlatGradients, FilterSpec], Backend]


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


def choose_backend(mode: str, spec: FilterSpec, num_micro_batches: int | None
                   ) -> BackendFactory:
    """The backend ``mode`` names for ``spec``: "auto" streams where the spec allows it."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "average":
        if spec.control is not None:
            raise ValueError("mode='average' (plain averaging) filters nothing: it takes no "
                             "control")
        return lambda flat, spec: AveragingBackend(flat)
    if mode == "streaming" and not spec.streams:
        # The streaming path computes cosine against the running sum only.
        what = (f"measure {spec.measure!r}" if spec.measure != "cosine"
                else f"rule {spec.rule!r}")
        raise ValueError(f"{what} needs every micro-gradient at once; use mode='stacked' "
                         "(streaming supports the cosine measure with rules mean, halving)")
    if mode == "streaming" or (mode == "auto" and spec.streams):
        return lambda flat, spec: StreamingBackend(flat, spec)
    return lambda flat, spec: StackedBackend(flat, spec, num_micro_batches)


class GradientCollector:
    """Collect micro-gradients from ``.grad`` and write back their filtered combination.

    Args:
        params: the parameters the optimizer updates (or its ``param_groups``).
        spec: the filter (:class:`gaf.FilterSpec`). Keyword arguments ``tau``, ``rule``,
            ``rule_options``, ``measure`` and ``control`` are sugar that build it
            (:func:`gaf.resolve_spec`); giving both is an error.
        mode: "auto", "streaming", "stacked" (module docstring) or "average" (plain
            gradient accumulation, no filter).
        num_micro_batches: expected M, if known: the stacked buffer is sized for it once
            instead of growing by doubling. Needed with a control in streaming mode.
        backend: ``backend(flat, spec) -> Backend``, building the collector's backend from
            its :class:`~gaf.micrograds.FlatGradients` (the distributed collector and the
            one-pass front ends pass one); then ``mode`` is ignored.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], spec: FilterSpec | None = None, *,
                 mode: str = "auto", num_micro_batches: int | None = None,
                 backend: BackendFactory | None = None, **filter_options):
        self.spec = spec = resolve_spec(spec, **filter_options)
        self.rule, self.rule_options, self.measure = spec.rule, spec.rule_options, spec.measure
        self.flat = FlatGradients(params)
        if backend is None:
            backend = choose_backend(mode, spec, num_micro_batches)
        self.backend: Backend = backend(self.flat, spec)
        self.mode = self.backend.mode
        if spec.control is not None and self.mode == "streaming" and not num_micro_batches:
            raise ValueError(
                "a control in streaming mode needs num_micro_batches= (its verdicts are "
                "drawn before the step's micro-gradients arrive)"
            )
        self.control = spec.control
        self._expected = num_micro_batches
        self.threshold = spec.threshold
        self.stats = FilterStats()
        # The gradient noise scale B_simple of the run, from each step's Gram matrix.
        self.noise_scale = NoiseScale()
        self.micro_batch_size: int | None = None  # collect()'s size when none is given
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
        """Start a step: point every ``.grad`` at a zeroed buffer of the collector (optional),
        so the first backward accumulates straight into it. Whatever ``.grad`` held is dropped."""
        if self._count:
            raise RuntimeError("begin() called in the middle of a step (after collect())")
        target = self.backend.begin()
        target.zero_()
        self.flat.bind(target)

    def collect(self, size: int | None = None) -> None:
        """Take the micro-gradient now in ``.grad`` and prepare ``.grad`` for the next one.
        ``size`` (samples; default :attr:`micro_batch_size`) lets :attr:`noise_scale` read
        the step's Gram matrix."""
        if self.flat.untouched():
            raise RuntimeError(
                "collect() found no new gradient: nothing was written to .grad since the "
                f"last {'collect()' if self._count else 'begin()'}. Run the micro-batch's "
                "backward before each collect() (a second collect() without a backward "
                "would add an all-zero micro-gradient)"
            )
        if self._count == 0 and self.control is not None and self._expected:
            self._draw_verdicts(self._expected)
        verdict = None if self._verdicts is None else bool(self._verdicts[self._count])
        self.backend.collect(self._count, verdict)
        self._sizes.append(self.micro_batch_size if size is None else size)
        self._count += 1

    def collect_batch(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                      inputs: Tensor | Sequence[Tensor], targets: Tensor,
                      num_micro_batches: int, *,
                      scale: Callable[[Tensor], Tensor] | None = None,
                      autocast: Callable[[], object] = nullcontext,
                      on_micro_gradient: Callable[[int], None] | None = None) -> Tensor:
        """Every micro-gradient of one batch split into ``num_micro_batches``; returns the
        mean micro-batch loss (detached). Call :meth:`finish` after. M forward/backward passes
        each followed by :meth:`collect` (``on_micro_gradient(k)`` in between), or one pass for a
        one-pass backend; ``scale`` (e.g. ``GradScaler.scale``) applies to each loss."""
        if self.backend.one_pass:
            if on_micro_gradient is not None:
                raise ValueError("on_micro_gradient needs micro_gradients='sequential': one "
                                 "pass never holds a micro-gradient in .grad")
            if self._count:
                raise RuntimeError("collect_batch() in the middle of a step (after collect())")
            losses = self.backend.collect_batch(BatchPass(
                model, loss_fn, inputs, targets, num_micro_batches, scale, autocast))
            self._count = num_micro_batches
            self._sizes = [len(t) for t in split_batch(targets, num_micro_batches)]
            return losses.mean()
        m = num_micro_batches
        self.begin()  # .grad → zeroed buffer: backward writes in place
        total = None
        for k, (x, y) in enumerate(zip(split_batch(inputs, m), split_batch(targets, m),
                                       strict=True)):
            with autocast():
                out = model(*x) if isinstance(x, (tuple, list)) else model(x)
                loss = loss_fn(out, y)
            back = loss / m if self.backend.divides_loss else loss
            (scale(back) if scale is not None else back).backward()
            if on_micro_gradient is not None:
                on_micro_gradient(k)
            self.collect(size=len(y))
            total = loss.detach().float() if total is None else total + loss.detach().float()
        return total / m

    def finish(self, *, amp: bool = False) -> FilterResult:
        """Filter the collected micro-gradients and write the result into ``.grad`` (``None``
        on a skip). With ``amp``, a non-finite micro-gradient is an overflow: every ``.grad`` is
        set to inf so that ``scaler.step`` skips and lowers its scale (``extra["overflow"]``)."""
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
        self._observe_noise_scale(result)
        overflow = amp and result.num_nonfinite > 0
        result.extra["overflow"] = overflow
        if overflow:
            self.flat.write(self.flat.new_buffer().fill_(float("inf")))
        elif result.skipped:
            self.flat.clear()
        else:
            self.flat.write(result.grad, cache=result.grad is self.backend.output.tensor)
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
        state["noise_scale"] = self.noise_scale.state_dict()
        state.update(self.backend.state())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore statistics, the threshold's and the control's state; refused, with nothing
        changed, for a state saved under another rule, measure, mode or fixed tau."""
        if not isinstance(state, dict) or not {"stats", "threshold"} <= set(state):
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a GradientCollector state_dict (it needs 'stats' and "
                             f"'threshold'; got {keys})")
        for name in ("rule", "measure", "mode"):
            mine = getattr(self, name)
            if state.get(name, mine) != mine:
                raise ValueError(
                    f"state was saved with {name} {state[name]!r}, but this collector has "
                    f"{name} {mine!r}: build it with {name}={state[name]!r} to resume")
        self.threshold.load_state_dict(state["threshold"])
        self.stats.load_state_dict(state["stats"])
        if self.control is not None and "control" in state:
            self.control.load_state_dict(state["control"])
        if "noise_scale" in state:
            self.noise_scale.load_state_dict(state["noise_scale"])
        self._step_tau = self.threshold.value()  # the next step tests the restored tau
        self.backend.start_step(self._step_tau)

    # -- the step's state -------------------------------------------------------------------

    def _draw_verdicts(self, micro_batches: int) -> None:
        """The control's verdicts for this step's rows, drawn once per step."""
        self._verdicts = np.asarray(self.control.draw(micro_batches * self.world_size),
                                    dtype=bool)

    def _observe_noise_scale(self, result: FilterResult) -> None:
        """The step's Gram (``extra["gram"]``: stacked, one-pass, distributed; not streaming)
        into :attr:`noise_scale`; every rank's micro-batches are taken to be this rank's size."""
        gram = result.extra.get("gram")
        sizes = self._sizes * self.world_size
        if gram is None or None in sizes or len(sizes) != gram.shape[0]:
            return
        self.noise_scale.update(gram, sizes)  # the host copy the decision already made
        if self.noise_scale.b_simple is not None:
            result.extra["b_simple"] = self.noise_scale.b_simple

    def _reset_step(self) -> None:
        self._count = 0
        self._sizes: list[int | None] = []
        self._verdicts: np.ndarray | None = None
        self._step_tau = self.threshold.value()
        self.backend.start_step(self._step_tau)
