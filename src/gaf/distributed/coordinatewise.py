"""Coordinate-wise median and trimmed mean across ranks: an all-gather baseline.

These aggregators (:mod:`gaf.core.coordinatewise`) need every coordinate of every row, so
each of N ranks all-gathers every rank's m rows ((N-1)·m·P elements moved, N·m·P held,
against 2·P·(N-1)/N for an all-reduce; ``traffic("coordinatewise", ...)`` in
benchmarks/traffic.py) and computes the same statistic from the same rows in rank-major
order: the same bits on every rank, equal to the one-device result over the stacked rows.
"""

from __future__ import annotations

import datetime

import torch
from torch import Tensor

from gaf.core import FilterResult, check_grads, result_from_decision
from gaf.core.coordinatewise import COORDINATEWISE_RULES, check_trim, coordinatewise
from gaf.distributed.comm import Comm, GAFDistributedError, all_gather_flat


def aggregate_coordinatewise_distributed(local_grads: Tensor, rule: str = "median", trim: int = 1,
                                         *, group=None,
                                         timeout: float | datetime.timedelta | None = None,
                                         out: Tensor | None = None) -> FilterResult:
    """The coordinate-wise ``rule`` ("median" or "trimmed-mean", dropping ``trim`` values
    at each end) over all ranks' rows; every rank gets the same [P] direction.

    ``local_grads`` [m, P]: this rank's rows (same m, P, dtype on every rank; call
    collectively). Returns a :class:`~gaf.core.FilterResult` over the N·m rows in
    rank-major order (statistics as in :mod:`gaf.core.coordinatewise`).
    """
    rows = check_grads(local_grads).contiguous()
    if rule not in COORDINATEWISE_RULES:
        raise ValueError(f"unknown coordinate-wise rule {rule!r}; choose one of "
                         f"{', '.join(COORDINATEWISE_RULES)}")
    comm = Comm(group, timeout)
    m, p = rows.shape
    shape = torch.tensor([m, p], dtype=torch.int64, device=rows.device)
    shapes = torch.empty(2 * comm.size, dtype=torch.int64, device=rows.device)
    comm.run("cross-rank check before the coordinate-wise gather", all_gather_flat,
             shapes, shape)
    if len(set(map(tuple, shapes.view(-1, 2).tolist()))) > 1:
        raise GAFDistributedError(
            f"ranks hold different [m, P] shapes: {shapes.view(-1, 2).tolist()}; every rank "
            "must collect the same number of micro-gradients of the same model")
    trim_used = check_trim(comm.size * m, trim) if rule == "trimmed-mean" else None
    every = torch.empty(comm.size * m * p, dtype=rows.dtype, device=rows.device)
    comm.run("all-gather of micro-gradients", all_gather_flat, every, rows.view(-1))
    every = every.view(comm.size * m, p)
    if out is None:
        out = rows.new_empty(p)
    decision = coordinatewise(every, trim_used, out)
    result = result_from_decision(decision, out, 2.0, rule)
    result.extra.update(method="allgather", world_size=comm.size, rank=comm.rank,
                        rows_per_rank=m, local_rows=slice(comm.rank * m, (comm.rank + 1) * m))
    return result
