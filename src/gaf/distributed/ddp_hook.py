"""GAF as a DDP communication hook: the filter where DDP already exchanges gradients.

Usage (one process per rank)::

    state = gaf.distributed.GAFHookState(tau=0.97)          # or GAFHookState(spec)
    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(state, gaf.distributed.gaf_hook)
    optimizer = state.wrap_optimizer(torch.optim.SGD(ddp.parameters(), lr=0.1))
    for x, y in loader:                     # each rank its own data
        loss_fn(ddp(x), y).backward()       # .grad now holds the filtered direction
        optimizer.step()                    # does nothing when state.skipped
        optimizer.zero_grad()

Each rank's gradient is one micro-gradient (under ``ddp.no_sync()`` accumulation, the
accumulated one), so a step filters N rows, in rank order. Per backward:

1. DDP hands each ``GradBucket`` to :func:`gaf_hook` as soon as its gradients are ready.
   The hook starts that bucket's ``all_to_all`` asynchronously (block-cyclic shards,
   :class:`~gaf.distributed.shard_exchange.ShardExchange`): rank r receives block r of
   every rank's bucket, P(N-1)/N elements moved, while backward goes on. Exchanges that
   have landed get their partial Gram matrix at the next bucket. The hook returns a
   future that is not yet complete: DDP waits for the futures only when backward ends.
2. At the last bucket (``bucket.is_last()``; DDP calls buckets in index order): wait for
   the remaining exchanges, all-reduce the N x N Gram matrix (the sum of the partial
   ones, float64), decide with :func:`gaf.core.decide` (same bits on every rank), write
   rank r's blocks of Σ w_i g_i into each bucket, gather the other blocks (P(N-1)/N
   again), and complete every future with its bucket.

Bytes moved equal one all-reduce; only the final gather is not overlapped with backward.
Each element of the direction is computed by one rank and copied to all, so parameters
stay bitwise identical. At tau = 2 the result is DDP's own average.

Skipped steps: the buckets are completed with zeros (no gather) and ``state.skipped`` is
True; a hook cannot stop ``optimizer.step()``, so let the state guard the optimizer
(:meth:`~gaf.distributed.step_state.GAFStepState.wrap_optimizer`): its next ``step()``
then does nothing, leaving parameters and optimizer state (momentum, Adam's moments and
step count) untouched. A rank gradient with inf/NaN (an fp16 overflow) is reported as an
overflow: every bucket is filled with inf, as DDP's mean would be, so a GradScaler skips
the step and lowers its scale; the guard skips it too.

Handled: DDP's bucket rebuild (buckets keyed by index, buffers reused while sizes hold),
``gradient_as_bucket_view``, ``find_unused_parameters``, half-precision buckets (Gram in
float64). ``state.result`` is the step's :class:`~gaf.core.FilterResult` over the N ranks;
its ``grad`` is empty: the direction is in the parameters' ``.grad`` (docs/ddp-hook.md).
"""

# No ``from __future__ import annotations``: DDP checks gaf_hook's annotations as objects.
import time

import torch
import torch.distributed as dist

from gaf.distributed.comm import Workspace
from gaf.distributed.protocol import CHUNK_ELEMENTS, GATHERS
from gaf.distributed.shard_exchange import ShardExchange
from gaf.distributed.step_state import GAFStepState, Timeout
from gaf.spec import FilterSpec


class GAFHookState(GAFStepState):
    """State of :func:`gaf_hook`: the spec, the step's pending buckets, the outcome.

    Args:
        spec: a :class:`gaf.FilterSpec`, or the keywords ``tau``, ``rule``,
            ``rule_options``, ``control`` (its sugar; :func:`gaf.resolve_spec`).
        process_group: the group DDP reduces over (default: the default group).
        timeout: seconds any collective may take before
            :class:`~gaf.distributed.GAFDistributedError`.
        chunk_elements: elements per all_to_all chunk within a bucket.
        gather: how the filtered blocks are gathered: "auto" (broadcasts for CPU buckets,
            all_gather for CUDA ones), "broadcast" or "all_gather".

    After each backward: ``state.result`` (:class:`~gaf.core.FilterResult`, rows = ranks),
    ``state.skipped``, ``state.stats`` (:class:`gaf.FilterStats`).
    """

    def __init__(self, spec: FilterSpec | None = None, *, tau=0.97, rule: str = "mean",
                 rule_options=None, control=None, process_group=None,
                 timeout: Timeout = None, chunk_elements: int = CHUNK_ELEMENTS,
                 gather: str = "auto"):
        super().__init__(spec, tau=tau, rule=rule, rule_options=rule_options,
                         control=control, process_group=process_group, timeout=timeout)
        if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) \
                or chunk_elements < 1:
            raise ValueError(f"chunk_elements must be a positive int, got {chunk_elements!r}")
        if gather not in GATHERS:
            raise ValueError(f"unknown gather {gather!r}; choose one of {', '.join(GATHERS)}")
        self.chunk_elements, self.gather = chunk_elements, gather
        self.workspace = Workspace()
        self._step: list = []  # (ShardExchange, Future, bucket buffer) of this backward

    def __getstate__(self):
        # DDP may pickle the state with the module (e.g. spawning); buffers stay behind.
        state = dict(self.__dict__)
        state.update(_comm=None, _step=[], workspace=Workspace())
        return state

    # -- the hook's two halves --------------------------------------------------------------

    def on_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future:
        try:
            comm = self.comm()
            buffer = bucket.buffer()
            if not buffer.is_floating_point():
                raise TypeError(f"GAF needs floating gradients, got a {buffer.dtype} bucket")
            exchange = ShardExchange(buffer, comm, self.workspace, f"bucket{bucket.index()}",
                                     self.chunk_elements, self.gather)
            exchange.start()
            # CUDA tensors need a future that knows their device (it records the stream's
            # events when completed, so DDP's reads are ordered after our writes).
            future = torch.futures.Future(devices=[buffer.device] if buffer.is_cuda else None)
            self._step.append((exchange, future, buffer))
            for earlier, _, _ in self._step[:-1]:
                earlier.poll()  # partial Grams of exchanges that have landed, no waiting
        except BaseException as exc:
            self._abandon(exc)  # a failed backward leaves nothing behind for the next one
            raise
        if bucket.is_last():
            self._finish(comm)
        return future

    def _abandon(self, exc: BaseException) -> None:
        step, self._step = self._step, []
        for _, future, _ in step:
            future.set_exception(exc)

    def _finish(self, comm) -> None:
        step = self._step
        try:
            buffers = [buffer for _, _, buffer in step]
            self.check_ranks(comm, sum(b.numel() for b in buffers), buffers[0].dtype,
                             [(b.numel(),) for b in buffers], buffers[0].device)
            gram = None
            for exchange, _, _ in step:
                part = exchange.gram()
                gram = part.clone() if gram is None else gram.add_(part)
            decision, tau, gram = self.decide(comm, gram)
            overflow = bool(decision.finite is not None and not decision.finite.all())
            if overflow:  # as DDP's mean would be: a GradScaler skips and backs off
                for buffer in buffers:
                    buffer.fill_(float("inf"))
            elif decision.skipped:
                for buffer in buffers:
                    buffer.zero_()
            else:
                works, since = [], time.monotonic()
                for exchange, _, buffer in step:
                    works.extend(exchange.finish(decision.weights, buffer))
                comm.wait("gather of the filtered shards", works, since)
                for exchange, _, _ in step:
                    exchange.after_gather()
            self.record(decision, tau, comm, buffers[0].new_empty(0), overflow=overflow,
                        buckets=len(step), grad_in="the parameters' .grad", gram=gram)
        except BaseException as exc:
            self._abandon(exc)
            raise
        self._step = []
        for _, future, buffer in step:
            future.set_result(buffer)


def gaf_hook(state: GAFHookState, bucket: dist.GradBucket
             ) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: Gradient Agreement Filtering over the N ranks' gradients.

    Register with ``ddp_model.register_comm_hook(state, gaf_hook)`` where ``state`` is a
    :class:`GAFHookState`; see :mod:`gaf.distributed.ddp_hook` for the protocol.
    """
    if not isinstance(state, GAFHookState):
        raise TypeError(
            "gaf_hook needs a gaf.distributed.GAFHookState as its state: "
            "ddp.register_comm_hook(GAFHookState(tau=...), gaf_hook)"
        )
    return state.on_bucket(bucket)
