"""The streaming backend: one running sum, the sequential fold applied as rows arrive.

Memory O(P) whatever M (rules "mean" and "halving"). Each micro-gradient is folded with
:func:`gaf.core.fold_row`, as the Gram replay does: with Python floats on the CPU (it
branches and skips work), with 0-d tensors and ``torch.where`` on an accelerator, so no
step synchronises with the host until :meth:`StreamingBackend.finish`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from gaf.core import (
    Decision,
    FilterResult,
    fold_row,
    fold_weights,
    get_rule,
    gram_dtype,
    host_dot,
    valid_norm_sq,
)
from gaf.core import result_from_decision as make_result
from gaf.micrograds.backend import BatchPass, needs_backwards
from gaf.micrograds.flat import FlatGradients, OutputBuffer
from gaf.spec import FilterSpec


class StreamingBackend:
    """Running sum s and |s|²; per-row statistics (accepted, distance, finite, valid)."""

    mode = "streaming"
    world_size = 1
    one_pass = False
    divides_loss = False

    def __init__(self, flat: FlatGradients, spec: FilterSpec):
        self.flat = flat
        self.rule = spec.rule
        self.halving = get_rule(spec.rule).halving
        # Decisions stay on the device (no host sync per micro-batch) except on the CPU,
        # where a sync is free and branching avoids a full-size torch.where.
        self.device_side = flat.device.type != "cpu"
        self.output = OutputBuffer(flat)
        self.rows = None  # never an [M, P] stack
        self._current: Tensor | None = None  # the micro-gradient being filled
        self._sum: Tensor | None = None  # the running direction s
        self._stats: list = []
        self._host_norm_sq, self._host_have_anchor = 0.0, False

    def _allocate(self) -> None:
        flat = self.flat
        self._current = flat.new_buffer()
        self._sum = flat.new_buffer()
        # On a device float32 products are made in float64: the host path's fallback
        # (gaf.core.host_dot) would need a sync, and float32 |g|² over/underflows for
        # finite rows (entries from about 1e19, or 1e-30).
        acc = torch.float64 if self.device_side else gram_dtype(flat.dtype)
        self._norm_sq = torch.zeros((), dtype=acc, device=flat.device)
        self._have_anchor = torch.zeros((), dtype=torch.bool, device=flat.device)

    def begin(self) -> Tensor:
        if self._current is None:
            self._allocate()
        return self._current

    def collect(self, k: int, verdict: bool | None) -> None:
        if self._current is None:
            self._allocate()
        g = self.flat.gather(self._current)
        acc = self._norm_sq.dtype
        # Products in the Gram dtype (float64 for half precision) so that streaming and
        # stacked see the same numbers.
        g_acc = g if g.dtype == acc else g.to(acc)
        if self.device_side:
            self._on_device(g, g_acc, verdict)
        else:
            self._on_host(g, g_acc, verdict)
        # The next backward accumulates into a zeroed buffer bound to .grad.
        g.zero_()
        self.flat.bind(g)

    def _on_host(self, g: Tensor, g_acc: Tensor, verdict: bool | None) -> None:
        s = self._sum
        norm_sq_g = host_dot(g_acc, g_acc)
        finite = math.isfinite(norm_sq_g)
        valid = valid_norm_sq(norm_sq_g)
        dot = 0.0
        if valid and self._host_have_anchor:  # only then is s·g needed
            s_acc = s if s.dtype == g_acc.dtype else s.to(g_acc.dtype)
            dot = host_dot(s_acc, g_acc, self._host_norm_sq, norm_sq_g)
        step = fold_row(self.halving, self._host_norm_sq, self._host_have_anchor, dot,
                        norm_sq_g, valid, self._tau, verdict)
        if step.accept:
            if step.anchor:
                s.copy_(g)  # s ← g: no zeroing of s needed between steps
            elif self.halving:
                s.mul_(0.5).add_(g, alpha=0.5)
            else:
                s.add_(g)
        self._host_norm_sq, self._host_have_anchor = step.norm_sq, step.have_anchor
        self._stats.append((float(step.accept), step.distance, float(finite), float(valid)))

    def _on_device(self, g: Tensor, g_acc: Tensor, verdict: bool | None) -> None:
        s = self._sum
        acc = g_acc.dtype
        s_acc = s if s.dtype == acc else s.to(acc)
        norm_sq_g = g_acc @ g_acc
        dot = s_acc @ g_acc
        finite = torch.isfinite(norm_sq_g)
        valid = valid_norm_sq(norm_sq_g)
        step = fold_row(self.halving, self._norm_sq, self._have_anchor, dot, norm_sq_g, valid,
                        self._tau, verdict)
        accept = step.accept
        # s ← a·s + b·g, with s zeroed at the step's start so the anchor's s ← g is an add.
        # Rejected rows are dropped with torch.where, never multiplied by zero (0·inf = NaN).
        if self.halving:
            a = torch.where(step.anchor, 0.0, 0.5).to(s.dtype)
            b = torch.where(step.anchor, 1.0, 0.5).to(s.dtype)
            s.copy_(torch.where(accept, a * s + b * g, s))
        else:
            s.add_(torch.where(accept, g, torch.zeros((), dtype=g.dtype, device=g.device)))
        self._norm_sq.copy_(step.norm_sq)
        self._have_anchor.copy_(step.have_anchor)
        self._stats.append(torch.stack([accept.to(acc), step.distance.to(acc), finite.to(acc),
                                        valid.to(acc)]))

    def collect_batch(self, batch: BatchPass) -> Tensor:
        raise needs_backwards(self.mode)

    def state(self) -> dict:
        return {}

    def buffers(self) -> list[Tensor]:
        """The P-sized buffers held between steps (for memory accounting)."""
        return [t for t in (self._current, self._sum, self.output.tensor) if t is not None]

    def start_step(self, tau: float) -> None:
        """Reset the per-step state; ``tau`` is the step's threshold."""
        self._tau = tau
        self._stats = []
        self._host_norm_sq, self._host_have_anchor = 0.0, False
        if self._sum is not None and self.device_side:
            # The device path adds the anchor to s; the host path copies it (no zeroing).
            self._sum.zero_()
            self._norm_sq.zero_()
            self._have_anchor.zero_()

    def finish(self, count: int, tau: float, verdicts: np.ndarray | None) -> FilterResult:
        if self.device_side:
            # The single device→host transfer of the step.
            host = torch.stack(self._stats).cpu().double().numpy()
        else:
            host = np.asarray(self._stats, dtype=np.float64)
        accepted = host[:, 0] > 0.5
        distances = host[:, 1].copy()
        finite, valid = host[:, 2] > 0.5, host[:, 3] > 0.5
        accepted_count = int(accepted.sum())
        # The running sum becomes the result in place, and the previous result buffer
        # becomes the next step's running sum: no copy of P numbers per step.
        grad = self._sum
        self._sum = self.output.swap(grad)
        if accepted_count == 0:
            grad.zero_()  # nothing was accepted; the buffer may hold an older step's sum
        if not self.halving:
            grad.div_(max(accepted_count, 1))
        # "mean": every accepted row weighs 1/count, no fold needed to say so.
        weights = (fold_weights(True, accepted) if self.halving
                   else accepted / max(accepted_count, 1))
        anchor = int(np.argmax(accepted)) if accepted_count else -1
        decision = Decision(accepted, weights, distances, anchor, valid, finite)
        return make_result(decision, grad, tau, self.rule)
