"""The one-pass backend: GAF from one forward and one backward of the whole batch.

The sequential collector runs M forward/backward passes of small micro-batches; small
passes use the hardware badly. Every rule needs only the Gram matrix G of the M
micro-gradients and then Σ_i w_i g_i (docs/design.md, "The Gram idea"), and both can come
from a single pass (docs/design.md, "One pass"). Per step, for a batch of B samples split
into M contiguous micro-batches
(``torch.tensor_split`` along dim 0, as :class:`~gaf.training.GAFTrainer` splits):

1. Forward the whole batch once. Hooks on every layer with trainable parameters keep its
   input (or, for normalisation layers, the normalised input x̂) and register a hook on its
   output. Training-mode BatchNorm is normalised per micro-batch ("ghost" batch norm), so
   it equals the sequential path (see below).
2. L = Σ_i loss_fn(out_i, y_i), the sum of the micro-batch losses. Backward once. The
   parameters are detached from autograd for the pass, so autograd computes only the
   activation gradients; the output hook of each layer receives δ = ∂L/∂output, whose
   rows of micro-batch i are the output gradients of L_i alone (L_j ignores the samples
   of micro-batch i). The layer's contribution G_layer[i, j] = <g_i, g_j> over its own
   parameters is formed there (:mod:`~gaf.micrograds.one_pass.linear` has the algebra and the per-
   layer choice between the "ghost" block products and materialised [M, P_l] blocks).
3. G = Σ_layers G_layer; the rule decides from G with :func:`gaf.core.decide`.
4. Σ_i w_i g_i per layer, from the same pieces: the kept [M, P_l] blocks weighted, or one
   weight-gradient product with each sample's δ scaled by its micro-batch's weight (the
   gradient of Σ_i w_i L_i). No second backward. Written into ``.grad`` (left ``None`` on
   a skipped step, whose direction is not computed: ``result.grad`` is then zero) by the
   collector, as for every backend.

Requirements:

* ``loss_fn(outputs, targets)`` must be a mean (or sum) over the samples it is given,
  with no term that couples samples, and the model must treat samples independently
  apart from BatchNorm: then the gradient of L_i is g_i exactly. Outputs, inputs and
  every captured layer's activations must have the sample axis first.
* Supported layers: Linear, Conv1d/2d/3d, Embedding (not sparse, not
  scale_grad_by_freq), LayerNorm, GroupNorm, BatchNorm1d/2d/3d, with their biases. Any
  other module owning a trainable parameter, and parameters tied between modules, raise a
  ValueError naming it: use the sequential path for such models.
* BatchNorm in training mode couples the samples of a batch; the sequential path sees
  micro-batch statistics, so the one-pass mode normalises each micro-batch with its own
  statistics and updates the running statistics once per micro-batch, in order: the same
  computation as M sequential forwards, so decisions and direction match it.

Memory beyond a plain step, until the decision: per layer the smaller of its [M, P_l]
blocks and its rows, plus kept blocks up to ``keep_budget`` (default P); never more than
M·P beyond the budget (``result.extra["held"]``, ``result.extra["plan"]``). Distributed
collectors need every rank's rows: :func:`gaf.collect_one_pass` gives them m rows from one
pass (:meth:`OnePassBackend.micro_gradients`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch import Tensor, nn

from gaf.core import FilterResult, decide, result_from_decision
from gaf.micrograds.backend import BatchPass, needs_one_pass
from gaf.micrograds.flat import FlatGradients, OutputBuffer
from gaf.micrograds.one_pass.conv import conv_direction, conv_pieces
from gaf.micrograds.one_pass.linear import (
    embedding_direction,
    embedding_pieces,
    linear_direction,
    linear_pieces,
)
from gaf.micrograds.one_pass.norm import GhostBatchNorm, norm_pieces, normalised
from gaf.micrograds.one_pass.pieces import Budget, Captured, MicroBatches, Weights
from gaf.micrograds.one_pass.plan import BATCH_NORM, plan_model
from gaf.spec import FilterSpec

PIECES = {"linear": linear_pieces, "conv": conv_pieces, "embedding": embedding_pieces,
          "norm": norm_pieces, "batchnorm": norm_pieces}
# Plans whose direction is computed from held rows (not from kept blocks), by layer kind.
DIRECTIONS = {"linear": linear_direction, "embedding": embedding_direction,
              "conv": conv_direction}


class _Start(torch.autograd.Function):
    """Attaches a tensor that needs no gradient to the graph, at no cost: the tensor is
    handed in inside a list, so it is not an input and may later be modified in place."""

    @staticmethod
    def forward(ctx, anchor: Tensor, box: list) -> Tensor:
        return box[0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, None


class OnePassBackend:
    """The micro-gradients of ``model`` from one forward and one backward (module docstring).

    Args:
        model: the module; every module owning one of ``flat``'s parameters must be
            supported (:mod:`~gaf.micrograds.one_pass.plan`).
        flat: the collector's view of the parameters to filter.
        spec: the filter spec; its rule and rule options decide from the pass's Gram
            matrix (the measure must be "cosine").
        keep_budget: how many micro-gradient numbers weight layers may keep for the
            direction instead of recomputing it (default: P, one gradient's worth).
    """

    mode = "one-pass"
    world_size = 1
    one_pass = True
    divides_loss = False

    def __init__(self, model: nn.Module, flat: FlatGradients, spec: FilterSpec,
                 keep_budget: int | None = None):
        if spec.measure != "cosine":
            raise ValueError(f"micro_gradients='one-pass' takes no collector, mode or measure: "
                             f"it filters by cosine from its own Gram matrix (measure "
                             f"{spec.measure!r} needs the sequential path)")
        self.model = model
        self.flat = flat
        self.rule, self.rule_options = spec.rule, spec.rule_options
        self.captures = plan_model(model, flat.params)
        self.keep_budget = flat.numel if keep_budget is None else int(keep_budget)
        self.output = OutputBuffer(flat)
        self._index = {id(p): i for i, p in enumerate(flat.params)}
        self._owner = {id(p): (c, n) for c in self.captures for n, p in c.params.items()}
        self._micro_batches: tuple | None = None  # (B, M, device) → MicroBatches, reused
        self._pass: tuple | None = None  # (gram, MicroBatches, losses) until finish()

    # -- the Backend interface ----------------------------------------------------------------

    def start_step(self, tau: float) -> None:
        """Drop what an unfinished pass left."""
        if self._pass is not None:
            self._reset_captures()
            self._pass = None

    def begin(self) -> Tensor:
        raise needs_one_pass(self.mode)

    def collect(self, k: int, verdict: bool | None) -> None:
        raise needs_one_pass(self.mode)

    def collect_batch(self, batch: BatchPass) -> Tensor:
        """Forward and backward of the whole batch; keeps every layer's Gram piece."""
        first = batch.inputs if isinstance(batch.inputs, Tensor) else batch.inputs[0]
        key = (first.shape[0], batch.num_micro_batches, first.device)
        if self._micro_batches is None or self._micro_batches[0] != key:
            self._micro_batches = (key, MicroBatches(*key))
        mb = self._micro_batches[1]
        if batch.targets.shape[0] != mb.total:
            raise ValueError(f"inputs have {mb.total} samples but targets "
                             f"{batch.targets.shape[0]}")
        losses = self._backward(batch.inputs, batch.targets, batch.loss_fn, mb, batch.scale,
                                batch.autocast or nullcontext)
        gram = None
        for cap in self.captures:
            if cap.gram is not None:
                gram = cap.gram if gram is None else gram + cap.gram
        if gram is None:
            self._reset_captures()
            raise ValueError("no trainable layer received a gradient: the loss does not "
                             "depend on the filtered parameters")
        self._pass = (gram, mb, losses)
        return losses

    def finish(self, count: int, tau: float, verdicts: np.ndarray | None) -> FilterResult:
        if self._pass is None:
            raise RuntimeError("finish() before collect_batch(): no pass to decide over")
        gram, mb, losses = self._pass
        self._pass = None
        decision = decide(gram, tau, self.rule, verdicts, self.rule_options)
        held = sum(t.numel() for cap in self.captures for t in cap.kept.values()) + sum(
            t.numel() for cap in self.captures for v in cap.extra.values()
            for t in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(t, Tensor))
        out = self.output.get()
        if decision.skipped:
            out.zero_()
        else:
            self._direction(decision, mb, out)
        result = result_from_decision(decision, out, tau, self.rule)
        result.extra.update(measure="cosine", mode="one-pass", losses=losses, held=held,
                            gram=gram.detach().to("cpu", torch.float64),
                            plan={f"{c.name}.{n}": how for c in self.captures
                                  for n, how in c.plan.items()})
        self._reset_captures()
        return result

    def buffers(self) -> list[Tensor]:
        return [t for t in (self.output.tensor,) if t is not None]

    def state(self) -> dict:
        return {}

    # -- the pass -------------------------------------------------------------------------

    def micro_gradients(self, inputs: Tensor | Sequence[Tensor], targets: Tensor,
                        loss_fn: Callable[[Tensor, Tensor], Tensor], num_micro_batches: int,
                        out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(rows [M, P], micro losses [M]): every micro-gradient, from one pass, in the order
        of ``flat``. Holds [M, P] like the stacked mode: for collectors that need the rows (the
        distributed protocol, :func:`gaf.collect_one_pass`). ``.grad`` is left untouched."""
        first = inputs if isinstance(inputs, Tensor) else inputs[0]
        mb = MicroBatches(first.shape[0], num_micro_batches, first.device)
        losses = self._backward(inputs, targets, loss_fn, mb, None, nullcontext,
                                materialise=True)
        rows = self.flat.new_buffer(mb.m) if out is None else out
        with torch.no_grad():
            offset = 0
            for p, n in zip(self.flat.params, self.flat.numels, strict=True):
                cap, name = self._owner[id(p)]
                block = cap.kept.get(name)
                if block is None:
                    rows[:, offset:offset + n].zero_()  # the layer never reached the loss
                else:
                    rows[:, offset:offset + n].copy_(block.reshape(mb.m, n))
                offset += n
        self._reset_captures()
        return rows, losses

    def _reset_captures(self) -> None:
        for cap in self.captures:
            cap.release()
            cap.gram, cap.kept, cap.extra, cap.plan = None, {}, {}, {}

    def _backward(self, inputs, targets, loss_fn, mb, scale, autocast,
                  materialise: bool = False) -> Tensor:
        budget = Budget(self.keep_budget, materialise)
        anchor = torch.zeros((), requires_grad=True)
        by_module = {id(c.module): c for c in self.captures}
        pending: dict[int, int] = {}

        def capture(cap: Captured | None, saved: Tensor, out: Tensor) -> Tensor:
            if cap is None:
                return out
            if not out.requires_grad:
                out = _Start.apply(anchor, [out])
            index = len(cap.saved)
            cap.saved.append(saved)
            cap.deltas.append(None)
            out.register_hook(lambda g, cap=cap, index=index: on_delta(cap, index, g))
            return out

        def on_delta(cap: Captured, index: int, grad: Tensor) -> None:
            cap.deltas[index] = grad
            pending[id(cap)] -= 1
            if pending[id(cap)] == 0:  # the module's last call: its pieces are complete
                PIECES[cap.kind](cap, mb, budget)

        def forward_hook(module, args, out):
            cap = by_module[id(module)]
            x = args[0]
            if x.shape[0] != mb.total or out.shape[0] != mb.total:
                raise ValueError(
                    f"module {cap.name} ({type(module).__name__}) sees {x.shape[0]} rows along "
                    f"dim 0, not the batch's {mb.total} samples: one-pass micro-gradients "
                    "need every activation sample-major")
            saved = normalised(module, x) if cap.kind in ("norm", "batchnorm") else x
            return capture(cap, saved, out)

        handles, ghosts = [], []
        for module in self.model.modules():
            if isinstance(module, BATCH_NORM) and (module.training or
                                                    module.running_mean is None):
                cap = by_module.get(id(module))
                module.forward = GhostBatchNorm(
                    module, mb, lambda bn, xhat, out, c=cap: capture(c, xhat, out))
                ghosts.append(module)
            elif id(module) in by_module:
                handles.append(module.register_forward_hook(forward_hook))
        for p in self.flat.params:
            p.requires_grad_(False)  # autograd then skips every weight gradient
        try:
            with autocast():
                out = self.model(*inputs) if isinstance(inputs, (tuple, list)) else \
                    self.model(inputs)
                micro = [loss_fn(o, y) for o, y in zip(out.split(mb.sizes),
                                                       targets.split(mb.sizes), strict=True)]
            micro = torch.stack(micro)
            total = micro.sum()
            if not total.requires_grad:
                raise ValueError("the loss does not depend on any filtered parameter")
            for cap in self.captures:
                pending[id(cap)] = len(cap.saved)
            (scale(total) if scale is not None else total).backward()
        finally:
            for p in self.flat.params:
                p.requires_grad_(True)
            for h in handles:
                h.remove()
            for module in ghosts:
                del module.forward
        with torch.no_grad():
            for cap in self.captures:  # outputs that did not reach the loss in some calls
                if pending.get(id(cap), 0) and any(d is not None for d in cap.deltas):
                    PIECES[cap.kind](cap, mb, budget)
                cap.release()
        return micro.detach().float()

    @torch.no_grad()
    def _direction(self, decision, mb: MicroBatches, out: Tensor) -> None:
        finite = bool(np.all(decision.finite if decision.finite is not None else True))
        weights = Weights(decision.weights, finite, out.device)
        views = self.flat.views(out, cache=True)
        for cap in self.captures:
            for name, p in cap.params.items():
                view = views[self._index[id(p)]]
                if name in cap.kept:
                    weights.kept(cap.kept[name], view)
                elif name == "weight" and ("rows" in cap.extra or "calls" in cap.extra):
                    DIRECTIONS[cap.kind](cap, weights, view)
                else:
                    view.zero_()  # the layer never reached the loss
