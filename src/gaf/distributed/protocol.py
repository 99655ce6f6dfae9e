"""Distributed GAF over torch.distributed at the communication cost of one all-reduce.

N ranks each hold m micro-gradients (rows of ``local_grads`` [m, P]). The decision is the
one :func:`gaf.filter_gradients` makes over all N·m rows in *rank-major* order (rank 0's
rows first, then rank 1's, ...), with the same rules and statistics. It needs only the
(N·m)×(N·m) Gram matrix G (design.md §3), and G is a sum over any split of the P
coordinates, which gives the bandwidth-optimal protocol (``method="sharded"``):

1. Pad P to N·S (S = ceil(P / N)) and cut every row into N shards of S elements.
   ``all_to_all``: rank r receives shard r of all N·m rows.
   Sends m·S·(N-1) elements per rank.
2. Rank r computes the partial Gram matrix of its shards, G_r = X_r X_rᵀ; ``all_reduce``
   (sum) gives G = Σ_r G_r on every rank. (N·m)² numbers: negligible.
3. Every rank runs the same :func:`gaf.core.decide` on the same, bit-identical G and so
   reaches the same weights w. No broadcast is needed.
4. Rank r computes shard r of Σ_i w_i g_i and ``all_gather`` assembles the full [P]
   direction on every rank. Sends S·(N-1) elements per rank.

With m = 1 that is 2·P·(N-1)/N elements sent per rank, exactly what a ring all-reduce of
the averaged gradient sends; in general (m+1)·P·(N-1)/N.

``method="allgather"`` is the naive protocol of the authors' research script: every rank
receives every other rank's full micro-gradients ((N-1)·m·P elements received, N·m·P
held) and computes the direction itself. It exists for comparison and as the fallback for
backends without ``all_to_all``. Its Gram matrix is still formed shard-wise and summed
with a tiny ``all_reduce``, so both methods see the same G and every rank provably
reaches the same decision whatever the BLAS does.

Deliberate choices:

* Bitwise agreement across ranks. In the sharded method each element of the direction is
  computed by exactly one rank and then copied to all, and G comes out of one all-reduce,
  so every rank holds the same bits; applying the same optimizer to the same bits keeps
  parameters identical. (The all-gather method computes the direction on every rank from
  the same inputs with the same elementwise arithmetic: identical on identical hardware.)
* Agreement with one device. The weighted sum is the same elementwise arithmetic as
  :func:`gaf.filter_gradients` (``weighted_sum``, same row order), and the weights depend
  only on the accepted set. G is a sum of partial products instead of one matmul, so it
  differs from the single-device G by rounding (~1e-7 relative in float32, ~1e-16 in
  float64): a distance within that of tau could in principle be decided differently.
* Non-finite rows. A row with inf/NaN in any shard makes its own row and column of G
  non-finite (and only those); :func:`gaf.core.decide` marks it invalid and zeroes it out,
  and ``weighted_sum`` never touches zero-weight rows, so it cannot poison the result.
* Every step first all-gathers a few integers (P, m, dtype, rule, tau, method, parameter
  layout) so that ranks that disagree fail with the same clear error on every rank instead
  of exchanging garbage or hanging. It costs one tiny collective (``check=False`` drops it).
* Failures. Every collective error (a peer died, the group timed out) is re-raised as
  :class:`GAFDistributedError` naming the rank, the collective and the elapsed time. The
  bound is the process group's timeout (``init_process_group(timeout=...)``, honoured by
  gloo and by NCCL's watchdog) or, if given, ``timeout=`` here, which waits on each
  collective with ``Work.wait(timeout)``.
"""

from __future__ import annotations

import datetime
import hashlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from gaf.core import (
    RULES,
    FilterResult,
    check_grads,
    check_rule,
    check_tau,
    decide,
    gram_matrix,
    result_from_decision,
    weighted_sum,
)

METHODS: tuple[str, ...] = ("sharded", "allgather")

# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
_all_gather_flat: Callable = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Backends that raised "all_to_all not supported": later calls go straight to all-gather.
_NO_ALL_TO_ALL: set[str] = set()

_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float32: 3,
    torch.float64: 4,
}


class GAFDistributedError(RuntimeError):
    """A distributed GAF step failed: ranks disagree, a peer died, or a collective timed out."""


# -- traffic arithmetic ------------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    """Elements one rank sends and receives per step, and how many it holds at once."""

    sent: int
    received: int
    held: int  # largest gradient buffer a rank holds (in elements)

    def bytes_sent(self, element_size: int = 4) -> int:
        return self.sent * element_size


def traffic(method: str, numel: int, m: int, world_size: int) -> Traffic:
    """Algorithmic per-rank traffic of one GAF exchange, in elements (Gram/check omitted).

    ``"sharded"``: (m+1)·S·(N-1), S = ceil(P/N), i.e. 2·P·(N-1)/N for m = 1.
    ``"allgather"``: (N-1)·m·P sent and received (ring all-gather), N·m·P held.
    ``"allreduce"``: the baseline ring all-reduce of one [P] gradient, 2·P·(N-1)/N.
    """
    n, p = world_size, numel
    s = -(-p // n)
    if method == "sharded":
        return Traffic(sent=(m + 1) * s * (n - 1), received=(m + 1) * s * (n - 1), held=n * m * s)
    if method == "allgather":
        return Traffic(sent=(n - 1) * m * p, received=(n - 1) * m * p, held=n * m * p)
    if method == "allreduce":
        return Traffic(sent=2 * s * (n - 1), received=2 * s * (n - 1), held=p)
    raise ValueError(f"unknown method {method!r}")


# -- collectives with clear failures -----------------------------------------------------


def _as_timedelta(timeout: float | datetime.timedelta | None) -> datetime.timedelta | None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


class _AllToAllUnsupported(Exception):
    pass


def _looks_unsupported(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, NotImplementedError) or (
        ("all_to_all" in text or "alltoall" in text)
        and ("support" in text or "implement" in text)
    )


class Comm:
    """The group, its size and this rank, and a way to run collectives that fail clearly."""

    def __init__(self, group=None, timeout: float | datetime.timedelta | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise GAFDistributedError(
                "torch.distributed is not initialised: call "
                "torch.distributed.init_process_group(...) first (torchrun sets the "
                "environment it needs), or use gaf.filter_gradients on one process"
            )
        self.group = group
        self.timeout = _as_timedelta(timeout)
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        if self.rank < 0:
            raise GAFDistributedError("this process is not a member of the given group")
        self.backend = str(dist.get_backend(group))

    def global_rank(self, group_rank: int) -> int:
        """Global rank of a rank of this group (broadcast's ``src`` is a global rank)."""
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def run(self, what: str, op: Callable, *args, unsupported_ok: bool = False, **kwargs) -> None:
        start = time.monotonic()
        try:
            if self.timeout is None:
                op(*args, group=self.group, **kwargs)
            else:
                work = op(*args, group=self.group, async_op=True, **kwargs)
                if work is not None and work.wait(timeout=self.timeout) is False:
                    raise TimeoutError(f"not complete after {self.timeout.total_seconds()} s")
        except Exception as exc:
            if unsupported_ok and _looks_unsupported(exc):
                raise _AllToAllUnsupported(str(exc)) from exc
            elapsed = time.monotonic() - start
            limit = (
                f"timeout={self.timeout.total_seconds():g} s"
                if self.timeout is not None
                else "the process group's timeout"
            )
            raise GAFDistributedError(
                f"GAF rank {self.rank}/{self.size}: {what} failed after {elapsed:.1f} s "
                f"({limit}): {type(exc).__name__}: {exc}. Another rank probably died, "
                "raised, or stopped taking part in the GAF step; every rank must call it "
                "the same number of times."
            ) from exc


# -- cross-rank agreement check ----------------------------------------------------------


def layout_hash(shapes: Sequence[Sequence[int]]) -> int:
    """A stable 62-bit hash of a parameter layout (list of shapes), equal on every rank."""
    text = ";".join(",".join(str(int(d)) for d in shape) for shape in shapes)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 2


_FIELDS = (
    "P (elements per micro-gradient)",
    "m (micro-gradients on the rank)",
    "dtype",
    "rule",
    "tau",
    "method",
    "number of trainable parameters",
    "parameter shapes (hash)",
)


def _tau_bits(tau: float) -> int:
    return int(np.array(tau, dtype=np.float64).view(np.int64))


def _describe(field: str, value: int) -> str:
    if field == "dtype":
        names = {code: str(dt) for dt, code in _DTYPE_CODES.items()}
        return names.get(value, f"code {value}")
    if field == "rule":
        return RULES[value] if 0 <= value < len(RULES) else f"code {value}"
    if field == "tau":
        return repr(float(np.array(value, dtype=np.int64).view(np.float64)))
    if field == "method":
        return METHODS[value] if 0 <= value < len(METHODS) else f"code {value}"
    if field.startswith("parameter shapes"):
        return f"{value:016x}"
    return str(value)


def check_agreement(comm: Comm, values: Sequence[int], device: torch.device, what: str) -> None:
    """All-gather ``values`` (one per entry of ``_FIELDS``) and raise on every rank if any
    differ. Every rank sees the same table, so every rank raises the same error."""
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    table = torch.empty(comm.size * mine.numel(), dtype=torch.int64, device=device)
    comm.run(f"cross-rank check before {what}", _all_gather_flat, table, mine)
    rows = table.view(comm.size, -1).cpu().tolist()
    problems = []
    for k, field in enumerate(_FIELDS):
        column = [row[k] for row in rows]
        if len(set(column)) > 1:
            per_rank = ", ".join(
                f"rank {r}: {_describe(field, v)}" for r, v in enumerate(column)
            )
            problems.append(f"{field} differs ({per_rank})")
    if problems:
        raise GAFDistributedError(
            f"GAF ranks disagree before {what}: " + "; ".join(problems) + ". Every rank must "
            "hold the same model, collect the same number of micro-batches per step and use "
            "the same tau, rule and method."
        )


# -- the protocol ------------------------------------------------------------------------


def _sharded(rows: Tensor, comm: Comm, tau: float, rule: str, gather_if_skipped: bool):
    m, p = rows.shape
    n = comm.size
    s = -(-p // n)
    # send[j] = shard j of this rank's rows, zero-padded to S elements: one copy of m·P.
    send = rows.new_empty((n, m, s))
    for j in range(n):
        lo, hi = min(j * s, p), min((j + 1) * s, p)
        send[j, :, : hi - lo].copy_(rows[:, lo:hi])
        send[j, :, hi - lo :].zero_()
    recv = torch.empty_like(send)
    comm.run("all_to_all of gradient shards", dist.all_to_all_single, recv, send,
             unsupported_ok=True)
    del send
    shards = recv.view(n * m, s)  # row i·m + k is shard r of rank i's k-th micro-gradient
    # Padding is zero, so it adds nothing to G. G in at least float32 (float64 for half).
    gram = gram_matrix(shards)
    comm.run("all_reduce of the partial Gram matrices", dist.all_reduce, gram)
    decision = decide(gram, tau, rule)  # the step's one device→host transfer
    full = rows.new_empty(n * s)
    if decision.skipped and not gather_if_skipped:
        return decision, full[:p].zero_()
    piece = rows.new_empty(s)
    weighted_sum(shards, decision.weights, piece)
    comm.run("all_gather of the filtered shards", _all_gather_flat, full, piece)
    return decision, full[:p]


def _allgather(rows: Tensor, comm: Comm, tau: float, rule: str):
    m, p = rows.shape
    n = comm.size
    every = rows.new_empty((n * m, p))
    comm.run("all_gather of micro-gradients", _all_gather_flat, every.view(-1),
             rows.contiguous().view(-1))
    # G from this rank's column shard, summed across ranks: the same G the sharded method
    # uses, bit-identical on every rank, and 1/N of the Gram work.
    s = -(-p // n)
    lo, hi = min(comm.rank * s, p), min((comm.rank + 1) * s, p)
    gram = gram_matrix(every[:, lo:hi])
    comm.run("all_reduce of the partial Gram matrices", dist.all_reduce, gram)
    decision = decide(gram, tau, rule)
    out = rows.new_empty(p)
    weighted_sum(every, decision.weights, out)
    return decision, out


def check_method(method: object) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method  # type: ignore[return-value]


def run_protocol(
    local_grads: Tensor,
    tau: float,
    rule: str,
    comm: Comm,
    *,
    method: str = "sharded",
    check: bool = True,
    layout: Sequence[Sequence[int]] | None = None,
    gather_if_skipped: bool = True,
) -> FilterResult:
    """The protocol behind :func:`filter_gradients_distributed`, for front ends that hold
    their own :class:`Comm`. ``gather_if_skipped=False`` saves the final all-gather on
    skipped steps (the direction is then returned as zeros: the optimizer will not use it)."""
    rows = check_grads(local_grads)
    tau, rule, method = check_tau(tau), check_rule(rule), check_method(method)
    if rows.dtype not in _DTYPE_CODES:
        raise TypeError(f"unsupported gradient dtype {rows.dtype}")
    m, p = rows.shape
    if check:
        values = (
            p, m, _DTYPE_CODES[rows.dtype], RULES.index(rule), _tau_bits(tau),
            METHODS.index(method),
            len(layout) if layout is not None else 0,
            layout_hash(layout) if layout is not None else 0,
        )
        check_agreement(comm, values, rows.device, "the GAF exchange")
    used = method
    if comm.size == 1:
        decision = decide(gram_matrix(rows), tau, rule)
        grad = weighted_sum(rows, decision.weights, rows.new_empty(p))
    elif method == "sharded" and comm.backend not in _NO_ALL_TO_ALL:
        try:
            decision, grad = _sharded(rows, comm, tau, rule, gather_if_skipped)
        except _AllToAllUnsupported as exc:
            # The backend refused all_to_all before any data moved; it does so on every
            # rank alike, so all ranks fall back together.
            warnings.warn(
                f"backend {comm.backend!r} has no all_to_all ({exc}); GAF falls back to the "
                "all-gather protocol, which moves (N-1)·m·P elements per rank",
                RuntimeWarning,
                stacklevel=3,
            )
            _NO_ALL_TO_ALL.add(comm.backend)
            used = "allgather"
            decision, grad = _allgather(rows, comm, tau, rule)
    else:
        used = "allgather"
        decision, grad = _allgather(rows, comm, tau, rule)
    result = result_from_decision(decision, grad, tau, rule)
    result.extra.update(
        method=used,
        world_size=comm.size,
        rank=comm.rank,
        rows_per_rank=m,
        local_rows=slice(comm.rank * m, (comm.rank + 1) * m),
    )
    return result


def filter_gradients_distributed(
    local_grads: Tensor,
    tau: float = 0.97,
    rule: str = "mean",
    *,
    group=None,
    method: str = "sharded",
    check: bool = True,
    timeout: float | datetime.timedelta | None = None,
) -> FilterResult:
    """Filter the micro-gradients of all ranks; every rank gets the full filtered direction.

    Args:
        local_grads: this rank's micro-gradients, [m, P] (one flat gradient per row). Every
            rank of the group must pass the same m, P and dtype, and call this collectively.
        tau, rule: as for :func:`gaf.filter_gradients`.
        group: the process group (default: the default group).
        method: ``"sharded"`` (bandwidth-optimal, default) or ``"allgather"``.
        check: all-gather a few integers first so that mismatched ranks fail clearly.
        timeout: seconds (or a timedelta) to wait for each collective before raising
            :class:`GAFDistributedError`; ``None`` uses the process group's timeout.

    Returns:
        A :class:`~gaf.core.FilterResult` over all N·m micro-gradients in rank-major order
        (rank r's rows are ``result.extra["local_rows"]``), identical on every rank, whose
        ``grad`` [P] lives on ``local_grads.device``.
    """
    comm = Comm(group, timeout)
    return run_protocol(local_grads, tau, rule, comm, method=method, check=check)
