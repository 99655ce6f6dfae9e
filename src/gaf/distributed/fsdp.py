"""GAF for FSDP2 (``fully_shard``) models, through FSDP's custom reduce-scatter.

Usage (one process per rank)::

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    state = gaf.distributed.GAFFSDPState(tau=0.97)
    state.register(model)                     # every FSDP unit's reduce-scatter is GAF's
    optimizer = state.wrap_optimizer(torch.optim.AdamW(model.parameters()))
    loss_fn(model(x), y).backward()           # each sharded .grad: the filtered shard
    optimizer.step()                          # does nothing when state.skipped
    optimizer.zero_grad()                     # set_to_none (the default): required

FSDP2 reduce-scatters each unit's flat gradient during backward: the input is [N, S] (row
j, the S elements destined for rank j), the output rank r's [S], with op AVG. GAF replaces
that collective (``FSDPModule.set_custom_reduce_scatter``), each rank's gradient being one
micro-gradient (N rows, rank order):

1. per unit, when FSDP calls: ``all_to_all`` of the input rows, asynchronously: rank r
   receives row r of every rank's input, i.e. its shard of all N gradients (the bytes of
   the reduce-scatter). Exchanges that have landed get their partial Gram matrix (float64)
   at the next unit's call. The output is zeroed; FSDP makes it (a view of it) the unit's
   sharded ``.grad``.
2. at the end of backward (an autograd-engine callback queued at the step's first unit,
   which runs after FSDP's own end-of-backward callback, so after every unit has
   reported): all-reduce the N x N Gram, decide (:func:`gaf.core.decide`, same bits on
   every rank), and write each unit's Σ w_i (shard of g_i) into its output. That *is* the
   sharded gradient FSDP wants: there is no all-gather, so GAF moves what FSDP's own
   reduce-scatter moves, plus N² numbers.

Where the sharded ``.grad`` is not a view of the output (checked for every parameter by
storage after backward), the filtered shard is copied into ``.grad`` directly. That is the
case when FSDP casts the reduced gradient (``MixedPrecisionPolicy(reduce_dtype=...)``
different from the parameters' dtype) or offloads it; it was a view in torch 2.13 with
neither. Refused with a clear error: a reduce op other than AVG (``reduce_dtype=float16``
uses SUM with pre/post-division, as do ``set_gradient_divide_factor`` and
``set_force_sum_reduction_for_comms``), HSDP meshes (FSDP would all-reduce the filtered
shards again), and a sharded ``.grad`` already present when a unit reduces (FSDP would add
the new shard to it; accumulate instead with ``model.set_requires_gradient_sync(False)``
on the micro-batches before the last, so the last backward reduces the accumulated
gradient, and clear gradients with ``zero_grad(set_to_none=True)``).

Memory: until the decision every unit's received rows are held (P elements per rank over
the model, where FSDP holds P/N), reused between steps; ``shard_dtype=torch.bfloat16``
halves what is moved and held, at bfloat16 rounding of the Gram and the direction.

Skipped steps: every output stays zero and ``state.skipped`` is True; guard the optimizer
with :meth:`~gaf.distributed.step_state.GAFStepState.wrap_optimizer` so that the step does
nothing. A non-finite rank gradient is reported as an overflow (outputs filled with inf,
the guard skips), as in the DDP hook.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gaf.core import gram_matrix, weighted_sum
from gaf.distributed.comm import GAFDistributedError, Workspace
from gaf.distributed.step_state import GAFStepState, Timeout
from gaf.spec import FilterSpec

SHARD_DTYPES = (None, torch.bfloat16, torch.float16, torch.float32)


def _fsdp_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError as exc:  # torch without FSDP2
        raise ImportError("GAF's FSDP2 path needs torch.distributed.fsdp.FSDPModule "
                          "(fully_shard, torch >= 2.6)") from exc
    return FSDPModule


def _param_group(module):
    """The unit's FSDP parameter group (torch 2.13 internals, checked here once)."""
    try:
        groups = module._get_fsdp_state()._fsdp_param_groups
    except AttributeError as exc:
        raise RuntimeError("this torch's FSDP2 internals differ from torch 2.13's, which GAF's "
                           "FSDP2 path was written against") from exc
    if not groups:
        return None  # a unit without parameters of its own: nothing to reduce
    if len(groups) != 1:
        raise ValueError("GAF's FSDP2 reduce-scatter needs one parameter group per unit "
                         f"(got {len(groups)}: shard_placement_fn with several meshes)")
    return groups[0]


class _Unit:
    """One unit's exchange in the current step."""

    def __init__(self, comm_obj, output: Tensor, recv: Tensor, work, keep: Tensor, comm):
        self.owner, self.output, self.recv, self.work = comm_obj, output, recv, work
        self.keep, self.comm = keep, comm  # ``keep``: the input, alive until the work is done
        self.partial: Tensor | None = None
        self.since = time.monotonic()

    def poll(self) -> None:
        if self.partial is None and (self.work is None or self.work.is_completed()):
            self.gram()

    def gram(self) -> Tensor:
        if self.partial is None:
            self.comm.wait("all_to_all of an FSDP unit's shards", [self.work], self.since)
            self.keep = None
            n = self.comm.size
            self.partial = gram_matrix(self.recv.view(n, -1)).to(torch.float64)
        return self.partial


class GAFReduceScatter:
    """The reduce-scatter of one FSDP unit (``allocate`` and ``__call__`` of FSDP2's
    ``ReduceScatter`` interface), delegating to its :class:`GAFFSDPState`."""

    def __init__(self, state: GAFFSDPState, module: nn.Module):
        self.state, self.module = state, module
        self.group = _param_group(module)

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: Tensor, input_tensor: Tensor, group, op,
                 async_op: bool = False):
        self.state._on_unit(self, output_tensor, input_tensor, group, op)
        return None


class GAFFSDPState(GAFStepState):
    """GAF over an FSDP2 model's ranks: the spec, the step's units, the outcome.

    Args:
        spec: a :class:`gaf.FilterSpec`, or the keywords ``tau``, ``rule``,
            ``rule_options``, ``control``.
        shard_dtype: dtype the shards are exchanged and held in until the decision
            (``None``: the reduce dtype; ``torch.bfloat16`` halves memory and bytes).
        timeout: seconds any collective may take.

    :meth:`register` installs the reduce-scatter on every FSDP unit of a model. After each
    backward: ``state.result`` (rows = ranks; its ``grad`` is empty, the direction is in
    the sharded ``.grad``), ``state.skipped``, ``state.stats``; ``state.copied`` counts the
    parameters whose sharded ``.grad`` was a copy, written directly.
    """

    def __init__(self, spec: FilterSpec | None = None, *, tau=0.97, rule: str = "mean",
                 rule_options=None, control=None, shard_dtype: torch.dtype | None = None,
                 timeout: Timeout = None):
        super().__init__(spec, tau=tau, rule=rule, rule_options=rule_options, control=control,
                         timeout=timeout)
        if shard_dtype not in SHARD_DTYPES:
            raise ValueError(f"shard_dtype must be one of {SHARD_DTYPES}, got {shard_dtype!r}")
        self.shard_dtype = shard_dtype
        self.workspace = Workspace()
        self.copied = 0
        self._units: list[_Unit] = []
        self._events: list = []  # CUDA: one per unit call, on FSDP's reduce-scatter stream

    def register(self, model: nn.Module) -> GAFFSDPState:
        """Give every ``fully_shard`` unit in ``model`` GAF's reduce-scatter."""
        fsdp_module = _fsdp_module_class()
        units = [m for m in model.modules() if isinstance(m, fsdp_module)]
        if not units:
            raise ValueError("no fully_shard unit in the model: call fully_shard first")
        for module in units:
            group = _param_group(module)
            if group is None:
                continue
            if getattr(group.mesh_info, "replicate_mesh_dim", None) is not None:
                raise ValueError("GAF's FSDP2 path does not support HSDP (a 2-D mesh): FSDP "
                                 "would all-reduce the filtered shards across replicas")
            module.set_custom_reduce_scatter(GAFReduceScatter(self, module))
        return self

    # -- during backward --------------------------------------------------------------------

    def _on_unit(self, owner: GAFReduceScatter, output: Tensor, inp: Tensor, group, op) -> None:
        try:
            self._start_unit(owner, output, inp, group, op)
        except BaseException:
            # backward fails and its end-of-backward callback will not run: start afresh
            self._units, self._events = [], []
            raise

    def _start_unit(self, owner: GAFReduceScatter, output: Tensor, inp: Tensor, group, op
                    ) -> None:
        if op != dist.ReduceOp.AVG:
            raise ValueError(
                f"GAF's FSDP2 reduce-scatter needs op AVG, FSDP asked for {op}: float16 "
                "reduce_dtype, set_gradient_divide_factor and force-sum reduction pre/post-"
                "divide around a SUM. Use MixedPrecisionPolicy(reduce_dtype=torch.float32) "
                "(or bfloat16) and FSDP's default divide factor"
            )
        for fsdp_param in owner.group.fsdp_params:
            if fsdp_param.sharded_param.grad is not None:
                raise RuntimeError(
                    "a sharded .grad is already present when FSDP reduces this unit: FSDP "
                    "would add the new shard to it, after GAF's decision. Clear gradients "
                    "with optimizer.zero_grad(set_to_none=True) before each step, and "
                    "accumulate micro-batches with model.set_requires_gradient_sync(False) "
                    "(the last backward then reduces, and filters, the accumulated gradient)"
                )
        comm = self.comm(group)
        if not self._units:  # the step's first unit: decide once backward has ended
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        n = comm.size
        if inp.numel() % n:
            raise AssertionError("FSDP's reduce-scatter input is not N equal rows")
        send = inp if self.shard_dtype in (None, inp.dtype) else inp.to(self.shard_dtype)
        recv = self.workspace.get(f"unit{id(owner)}", send.numel(), send.dtype, send.device)
        work = comm.start("all_to_all of an FSDP unit's shards", dist.all_to_all_single,
                          recv, send)
        output.zero_()  # until the decision: a skipped step's gradient
        for unit in self._units:
            unit.poll()
        self._units.append(_Unit(owner, output, recv, work, send, comm))
        if output.is_cuda:
            # FSDP calls this on its reduce-scatter stream; the decision runs on the
            # current stream at the end of backward and must follow these ops.
            self._events.append(torch.cuda.current_stream(output.device).record_event())

    def _finish(self) -> None:
        units, self._units = self._units, []
        events, self._events = self._events, []
        if not units:  # the step's units were dropped after a failure
            return
        for event in events:
            torch.cuda.current_stream(units[0].output.device).wait_event(event)
        comm = units[0].comm
        outputs = [u.output for u in units]
        self.check_ranks(comm, sum(o.numel() for o in outputs), outputs[0].dtype,
                         [(o.numel(),) for o in outputs], outputs[0].device)
        gram = None
        for unit in units:
            part = unit.gram()
            gram = part.clone() if gram is None else gram.add_(part)
        decision, tau, gram = self.decide(comm, gram)
        overflow = bool(decision.finite is not None and not decision.finite.all())
        for unit in units:
            if overflow:
                unit.output.fill_(float("inf"))
            elif not decision.skipped:
                rows = unit.recv.view(comm.size, -1)
                if rows.dtype != unit.output.dtype:  # bf16 shards: sum in the output dtype
                    rows = rows.to(unit.output.dtype)
                weighted_sum(rows, decision.weights, unit.output)
            self._write_copies(unit)
        self.record(decision, tau, comm, outputs[0].new_empty(0), overflow=overflow,
                    units=len(units), gram=gram)

    def _write_copies(self, unit: _Unit) -> None:
        """Copy the filtered shard into every sharded .grad that is not a view of the
        output (FSDP cast or moved it), at the offsets FSDP used to view the output."""
        base = unit.output.untyped_storage().data_ptr()
        offset = 0
        for fsdp_param in unit.owner.group.fsdp_params:
            grad = fsdp_param.sharded_param.grad
            if grad is None:  # no gradient this step: FSDP left it out of the input
                continue
            local = grad._local_tensor if hasattr(grad, "_local_tensor") else grad
            if local.untyped_storage().data_ptr() != base:
                view = torch.as_strided(unit.output, size=fsdp_param.sharded_size,
                                        stride=fsdp_param.contiguous_sharded_stride,
                                        storage_offset=offset)
                local.copy_(view)
                self.copied += 1
            offset += fsdp_param.padded_sharded_param_size.numel()
        if offset != unit.output.numel():
            raise GAFDistributedError(
                f"FSDP's sharded gradients cover {offset} of the unit's {unit.output.numel()} "
                "reduced elements: this torch's FSDP2 layout differs from torch 2.13's"
            )
