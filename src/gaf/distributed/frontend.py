"""Distributed front ends: a collector and a one-call trainer over the protocol.

Usage (one process per rank, e.g. under ``torchrun``)::

    collector = gaf.distributed.DistributedGradientCollector(
        model.parameters(), tau=0.97, buffers=model)   # collective: all ranks construct it
    for x, y in my_micro_batches:                      # m micro-batches on this rank
        loss_fn(model(x), y).backward()
        collector.collect()
    result = collector.finish()    # one decision over all N·m micro-gradients, same on
    if not result.skipped:         # every rank; the filtered direction is now in .grad
        optimizer.step()

The collector is :class:`~gaf.collector.GradientCollector` over a
:class:`~gaf.distributed.backend.DistributedBackend` (stacked rows; no streaming mode:
the rules need every rank's rows at once). DDP's own all-reduce must not run as well:
give the collector an unwrapped model (it broadcasts parameters from rank 0 and can sync
buffers), or run the micro-batches under ``ddp_model.no_sync()``, as
:class:`DistributedGAFTrainer` does by itself. See docs/distributed.md.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gaf.collector import GradientCollector
from gaf.distributed.backend import DistributedBackend
from gaf.distributed.comm import Comm
from gaf.distributed.protocol import GATHERS, check_method
from gaf.distributed.settings_check import check_settings, step_fields
from gaf.micrograds import FlatGradients
from gaf.spec import FilterSpec, resolve_spec
from gaf.training import GAFTrainer, check_optimizer_params

BUFFER_SYNC: tuple[str, ...] = ("broadcast", "mean")

Timeout = float | datetime.timedelta | None


def _tensors(items: nn.Module | Iterable[Tensor] | None, what: str) -> list[Tensor]:
    if items is None:
        return []
    if isinstance(items, nn.Module):
        return list(items.buffers()) if what == "buffers" else list(items.parameters())
    return list(items)


def _coalesced(tensors: Sequence[Tensor], fn: Callable[[Tensor], None]) -> None:
    """Apply ``fn`` to one flat copy per (device, dtype) of ``tensors``, then copy back:
    one collective per kind instead of one per tensor."""
    kinds: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        kinds.setdefault((t.device, t.dtype), []).append(t)
    for group in kinds.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        fn(flat)
        offset = 0
        for t in group:
            n = t.numel()
            with torch.no_grad():
                t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def broadcast_parameters(
    params: nn.Module | Iterable[Tensor], *, group=None, src: int = 0, timeout: Timeout = None
) -> None:
    """Copy the values of ``params`` from group rank ``src`` to every rank (as DDP does at
    construction), so that identical updates keep them identical."""
    comm = Comm(group, timeout)
    tensors = _tensors(params, "parameters")
    root = comm.global_rank(src)
    _coalesced(tensors, lambda flat: comm.run("broadcast of parameters", dist.broadcast, flat,
                                              src=root))


def sync_buffers(buffers: nn.Module | Iterable[Tensor], mode: str = "broadcast", *, group=None,
                 timeout: Timeout = None) -> None:
    """Make buffers (e.g. BatchNorm running statistics) identical on every rank:
    ``"broadcast"`` takes group rank 0's (as DDP does); ``"mean"`` averages floating buffers
    over ranks and broadcasts the others (``num_batches_tracked``)."""
    if mode not in BUFFER_SYNC:
        raise ValueError(f"unknown buffer sync {mode!r}; choose one of {', '.join(BUFFER_SYNC)}")
    comm = Comm(group, timeout)
    tensors = _tensors(buffers, "buffers")
    root = comm.global_rank(0)
    averaged = [t for t in tensors if mode == "mean" and t.is_floating_point()]
    copied = [t for t in tensors if not (mode == "mean" and t.is_floating_point())]

    def mean(flat: Tensor) -> None:
        comm.run("all_reduce of buffers", dist.all_reduce, flat)
        flat.div_(comm.size)

    _coalesced(averaged, mean)
    _coalesced(copied, lambda flat: comm.run("broadcast of buffers", dist.broadcast, flat,
                                             src=root))


class DistributedGradientCollector(GradientCollector):
    """:class:`~gaf.collector.GradientCollector` across the ranks of a process group.

    Each rank collects m micro-gradients per step (the same m everywhere); ``finish()``
    filters all N·m of them in rank-major order (:mod:`gaf.distributed.protocol`) and
    writes the same direction (or ``None``) into ``.grad`` on every rank. Construction is
    collective: it checks the parameter layout across ranks and, with ``sync_params``,
    broadcasts parameters and buffers from group rank 0, as DDP does.

    Args:
        params: the parameters the optimizer updates (or its ``param_groups``).
        spec: the filter (:class:`gaf.FilterSpec`, the same on every rank; its measure
            must be "cosine"); ``tau``, ``rule``, ``rule_options``, ``control`` as keyword
            sugar. A :class:`~gaf.thresholds.Threshold` works too: it sees the same
            results on every rank, so it stays in step; a control must be built with the
            same seed on every rank, so that every rank draws the same verdicts.
        group: process group (default: the default group).
        method: ``"sharded"`` (bandwidth-optimal, default) or ``"allgather"``.
        buffers: a module (its buffers) or tensors to keep identical across ranks after
            every step; ``None`` leaves buffers alone.
        buffer_sync: ``"broadcast"`` from rank 0 (default) or ``"mean"``; see
            :func:`sync_buffers`.
        sync_params: broadcast parameters (and buffers) from rank 0 at construction.
        check: compare P, m, dtype, tau, rule, method and parameter shapes across ranks
            before every exchange (one tiny all-gather).
        timeout: seconds (or timedelta) any collective may take before
            :class:`~gaf.distributed.GAFDistributedError`; ``None``: the group's timeout.
        gather: how the filtered blocks are gathered, "auto", "broadcast" or "all_gather"
            (:func:`~gaf.distributed.protocol.run_protocol`).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], spec: FilterSpec | None = None, *,
                 group=None, method: str = "sharded",
                 buffers: nn.Module | Iterable[Tensor] | None = None,
                 buffer_sync: str = "broadcast", sync_params: bool = True, check: bool = True,
                 timeout: Timeout = None, gather: str = "auto", **filter_options):
        spec = resolve_spec(spec, **filter_options)
        DistributedBackend.check_spec(spec)
        method = check_method(method)
        if buffer_sync not in BUFFER_SYNC:
            raise ValueError(
                f"unknown buffer sync {buffer_sync!r}; choose one of {', '.join(BUFFER_SYNC)}"
            )
        if gather not in GATHERS:
            raise ValueError(f"unknown gather {gather!r}; choose one of {', '.join(GATHERS)}")
        comm = Comm(group, timeout)
        buffer_list = _tensors(buffers, "buffers")

        def sync() -> None:
            sync_buffers(buffer_list, buffer_sync, group=comm.group, timeout=comm.timeout)

        def backend(flat: FlatGradients, spec: FilterSpec) -> DistributedBackend:
            return DistributedBackend(flat, spec, comm, method, check,
                                      sync if buffer_list else None, gather)

        super().__init__(params, spec, backend=backend)
        self.comm, self.method, self.buffers = comm, method, buffer_list
        # Catch a different model on some rank before anything is broadcast over it.
        check_settings(
            comm,
            step_fields(self.flat.numel, 0, self.flat.dtype, self.rule, self.tau, method,
                        self.backend.layout, self.rule_options),
            self.flat.device,
            "building the distributed collector",
        )
        if sync_params:
            broadcast_parameters(self.flat.params, group=group, timeout=timeout)
            if buffer_list:
                sync_buffers(buffer_list, "broadcast", group=group, timeout=timeout)

    @property
    def rank(self) -> int:
        return self.comm.rank


class DistributedGAFTrainer(GAFTrainer):
    """:class:`~gaf.training.GAFTrainer` over a :class:`DistributedGradientCollector`: each
    rank splits *its* batch into ``num_micro_batches`` micro-batches, and the step filters
    all N·m micro-gradients (m = 1 per rank is fine: N·m >= 2 rows).

    Every rank applies the same optimizer to the same filtered gradient, so parameters
    stay bitwise identical. A ``DistributedDataParallel`` model runs under ``no_sync()``.

    Args are those of :class:`~gaf.training.GAFTrainer` (``spec`` or its keyword sugar;
    the backend is always the distributed one, the measure "cosine") plus ``group``,
    ``method``, ``buffer_sync`` (``None`` to leave buffers alone), ``sync_params``,
    ``check``, ``timeout`` and ``gather`` of :class:`DistributedGradientCollector`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[Tensor, Tensor], Tensor], num_micro_batches: int,
                 spec: FilterSpec | None = None, *, group=None, method: str = "sharded",
                 buffer_sync: str | None = "broadcast", sync_params: bool = True,
                 max_grad_norm: float | None = None, scaler: torch.amp.GradScaler | None = None,
                 autocast_dtype: torch.dtype | None = None, check: bool = True,
                 timeout: Timeout = None, gather: str = "auto", **filter_options):
        check_optimizer_params(model, optimizer)
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        collector = DistributedGradientCollector(
            optimizer.param_groups, spec, group=group, method=method,
            buffers=inner if buffer_sync is not None else None,
            buffer_sync=buffer_sync or "broadcast", sync_params=sync_params, check=check,
            timeout=timeout, gather=gather, **filter_options,
        )
        super().__init__(model, optimizer, loss_fn, num_micro_batches,
                         max_grad_norm=max_grad_norm, scaler=scaler,
                         autocast_dtype=autocast_dtype, collector=collector)
