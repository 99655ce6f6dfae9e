"""Distributed GAF over torch.distributed at the communication cost of one all-reduce.

N ranks each hold m micro-gradients (rows of ``local_grads`` [m, P]). The decision is the
one :func:`gaf.filter_gradients` makes over all N·m rows in *rank-major* order (rank 0's
rows first, then rank 1's, ...), with the same rules and statistics. It needs only the
(N·m)×(N·m) Gram matrix G (docs/design.md, "The Gram idea"), and G is a sum over any
split of the P coordinates, which gives the bandwidth-optimal protocol (``method="sharded"``):

1. Cut the P coordinates into N shards, one per rank. ``all_to_all``: rank r receives
   shard r of all N·m rows. Sends m·P·(N-1)/N elements per rank.
2. Rank r computes the partial Gram matrix of its shards, G_r = X_r X_rᵀ; ``all_reduce``
   (sum) gives G = Σ_r G_r on every rank. (N·m)² numbers: negligible.
3. Every rank runs the same :func:`gaf.core.decide` on the same, bit-identical G and so
   reaches the same weights w. No broadcast is needed.
4. Rank r computes shard r of Σ_i w_i g_i; a gather assembles the full [P] direction on
   every rank. Sends P·(N-1)/N elements per rank.

With m = 1 that is 2·P·(N-1)/N elements sent per rank, exactly what a ring all-reduce of
the averaged gradient sends; in general (m+1)·P·(N-1)/N.

The shards are block-cyclic (:class:`ShardPlan`), in chunks of about ``CHUNK_ELEMENTS``
exchanged concurrently, the Gram of one computed while others are in flight; for m = 1 a
chunk is a contiguous slice of the row, sent without copies. The gather is N concurrent
broadcasts on CPU tensors (gloo's all_gather is 2-3x slower) and ``all_gather`` elsewhere.
``method="allgather"`` (the authors' research script: every rank receives every full
micro-gradient, (N-1)·m·P elements) is kept for comparison and as the fallback for
backends without ``all_to_all``; its Gram too is summed from shards.

Deliberate choices:

* Bitwise agreement across ranks: each element of the direction is computed by one rank
  and copied to all, and G comes out of one all-reduce, so every rank decides the same
  and holds the same bits.
* Agreement with one device: the weighted sum is :func:`gaf.filter_gradients`'s
  arithmetic in the same row order (bit-identical in float32/float64; half precision may
  differ in the last bit). G, a sum of partial products, differs from one matmul by
  rounding (~1e-7 relative in float32), so a distance within that of tau could be decided
  differently than on one device (never differently across ranks).
* A non-finite row makes only its own row and column of G non-finite; the decision marks
  it invalid and ``weighted_sum`` never touches zero-weight rows.
* A reused :class:`Workspace` and ``out`` make a step allocate nothing. Every step first
  runs the cross-rank check (:mod:`~gaf.distributed.settings_check`).
"""

from __future__ import annotations

import datetime
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from gaf.core import (
    FilterResult,
    check_grads,
    check_rule,
    check_tau,
    decide,
    gram_matrix,
    result_from_decision,
    weighted_sum,
)
from gaf.distributed.comm import AllToAllUnsupported, Comm, Workspace, all_gather_flat
from gaf.distributed.settings_check import DTYPE_CODES, METHODS, check_settings, step_fields

GATHERS: tuple[str, ...] = ("auto", "broadcast", "all_gather")

# Backends that raised "all_to_all not supported": later calls go straight to all-gather.
_NO_ALL_TO_ALL: set[str] = set()


@dataclass(frozen=True)
class ShardPlan:
    """Block-cyclic sharding of P coordinates over N ranks, in chunks.

    Chunk c covers coordinates [c·N·B, (c+1)·N·B) and consists of N blocks of B; block j
    of every chunk belongs to rank j. Each chunk is one contiguous slice of a row, so with
    m = 1 a chunk is sent straight from the gradient and gathered straight into the
    output, without copies. Only the last chunk may be short (its blocks clipped at P,
    some possibly empty). Chunking also lets the Gram of one chunk be computed while the
    next is in flight, and on gloo it is markedly faster than one huge exchange.
    """

    numel: int
    world_size: int
    block: int
    chunks: int

    @staticmethod
    def make(numel: int, world_size: int, chunk_elements: int) -> ShardPlan:
        k = max(1, -(-numel // max(1, chunk_elements)))
        block = max(1, -(-numel // (k * world_size)))
        chunks = max(1, -(-numel // (world_size * block)))
        return ShardPlan(numel, world_size, block, chunks)

    def chunk(self, c: int) -> tuple[int, list[int]]:
        """Start of chunk c and the lengths of its N blocks."""
        base = c * self.world_size * self.block
        lens = [min(self.block, max(0, self.numel - base - j * self.block))
                for j in range(self.world_size)]
        return base, lens


# Elements per chunk (all ranks' blocks together), 2M float32 = 8 MB. On gloo, chunks
# of 1M-6M elements were up to ~1.5x faster than one exchange of 25M.
CHUNK_ELEMENTS = 1 << 21


def gather_by_broadcast(device: torch.device, gather: str) -> bool:
    """How to gather the filtered blocks: N concurrent broadcasts (one rooted at each rank)
    or all_gather. Same bytes either way; gloo's CPU all_gather measured 2-3x slower than
    the broadcasts, while NCCL's all_gather is the ring-optimal one ("auto" picks so)."""
    if gather not in GATHERS:
        raise ValueError(f"unknown gather {gather!r}; choose one of {', '.join(GATHERS)}")
    if gather != "auto":
        return gather == "broadcast"
    return device.type == "cpu"


def gather_filtered(comm: Comm, plan: ShardPlan, shards: list[Tensor], weights: np.ndarray,
                    out: Tensor, by_broadcast: bool, tail, what: str) -> tuple[list, list]:
    """Write rank r's blocks of Σ w_i g_i (``shards[c]``: block r of every row of chunk c)
    into ``out`` and start gathering every other rank's blocks into it: N concurrent
    broadcasts, or all_gather of equal blocks, the short last chunk through the padded
    buffer ``tail()``. Returns the works and the (dst, src) copies to make after them."""
    n, r, b = comm.size, comm.rank, plan.block
    works, after = [], []
    for c, shard in enumerate(shards):
        base, lens = plan.chunk(c)
        total = sum(lens)
        if by_broadcast:  # written in place; each block is then broadcast from its owner
            weighted_sum(shard, weights, out[base + r * b : base + r * b + lens[r]])
            for j, length in enumerate(lens):
                if length:
                    part = out[base + j * b : base + j * b + length]
                    works.append(comm.start(what, dist.broadcast, part, src=comm.global_rank(j)))
            continue
        if total == n * b:  # equal blocks, gathered straight into ``out``
            target = out[base : base + total]
        else:  # short last chunk: gather padded, keep the prefix (only the tail is short)
            target = tail()
            after.append((out[base : base + total], target[:total]))
        piece = target[r * b : (r + 1) * b]
        weighted_sum(shard, weights, piece[: lens[r]])
        piece[lens[r] :].zero_()
        works.append(comm.start(what, all_gather_flat, target, piece))
    return works, after


def _sharded(rows: Tensor, comm: Comm, tau: float, rule: str, ws: Workspace, out: Tensor,
             gather_if_skipped: bool, chunk_elements: int, verdicts, options, gather: str):
    m, p = rows.shape
    n, r = comm.size, comm.rank
    plan = ShardPlan.make(p, n, chunk_elements)
    b = plan.block
    recv = ws.get("recv", plan.chunks * n * m * b, rows.dtype, rows.device)
    staging = ws.get("send", m * p, rows.dtype, rows.device) if m > 1 else None

    # 1. all_to_all, chunk by chunk: rank r receives block r of every rank's rows. All
    #    chunks are issued at once; the Gram of each is added up as it arrives.
    since = time.monotonic()
    what = "all_to_all of gradient shards"
    works, shards = [], []
    for c in range(plan.chunks):
        base, lens = plan.chunk(c)
        total = sum(lens)
        if m == 1:
            send = rows[0, base : base + total]
        else:  # rows[:, block j] is strided: pack the chunk as [N][m][len_j]
            send = staging[m * base : m * (base + total)]
            offset = 0
            for j, length in enumerate(lens):
                lo = base + j * b
                send[offset : offset + m * length].view(m, length).copy_(rows[:, lo : lo + length])
                offset += m * length
        mine = lens[r]
        received = recv[c * n * m * b : c * n * m * b + n * m * mine]
        splits = {}
        if any(length != b for length in lens):
            splits = dict(output_split_sizes=[m * mine] * n,
                          input_split_sizes=[m * length for length in lens])
        works.append(comm.start(what, dist.all_to_all_single, received, send,
                                unsupported_ok=True, **splits))
        # Row i·m + k: block r of rank i's k-th micro-gradient (rank-major order).
        shards.append(received.view(n * m, mine))
    gram = None
    for c, work in enumerate(works):
        comm.wait(what, [work], since, unsupported_ok=True)
        # Summed in float64: a float32 Gram falls back to float64 on the ranks whose shards
        # would over- or underflow (gram_matrix), and every rank must reduce the same dtype.
        partial = gram_matrix(shards[c]).to(torch.float64)
        gram = partial if gram is None else gram.add_(partial)

    # 2.-3. Sum the partial Grams; every rank decides from the same bits.
    comm.run("all_reduce of the partial Gram matrices", dist.all_reduce, gram)
    gram = gram.cpu()  # the one host copy of the (N·m)² G: the decision and extra['gram']
    decision = decide(gram, tau, rule, verdicts, options)
    if decision.skipped and not gather_if_skipped:
        return decision, out.zero_(), gram

    # 4. Rank r computes its blocks of Σ w_i g_i; every rank gathers all blocks.
    since = time.monotonic()
    what = "gather of the filtered shards"
    works, after = gather_filtered(
        comm, plan, shards, decision.weights, out, gather_by_broadcast(rows.device, gather),
        lambda: ws.get("tail", n * b, rows.dtype, rows.device), what)
    comm.wait(what, works, since)
    for dst, src in after:
        dst.copy_(src)
    return decision, out, gram


def _allgather(rows: Tensor, comm: Comm, tau: float, rule: str, ws: Workspace, out: Tensor,
               chunk_elements: int, verdicts, options, gather: str):
    m, p = rows.shape
    n, r = comm.size, comm.rank
    every = ws.get("every", n * m * p, rows.dtype, rows.device).view(n, m * p)
    every[r].copy_(rows.reshape(-1))
    since = time.monotonic()
    what = "all-gather of micro-gradients"
    if gather_by_broadcast(rows.device, gather):  # the same gather primitive as "sharded"
        step = max(1, chunk_elements // n)
        works = [
            comm.start(what, dist.broadcast, every[j, lo : lo + step], src=comm.global_rank(j))
            for lo in range(0, m * p, step)
            for j in range(n)
        ]
    else:
        works = [comm.start(what, all_gather_flat, every.view(-1), every[r])]
    comm.wait(what, works, since)
    every = every.view(n * m, p)
    # G from this rank's column shard, summed across ranks: bit-identical on every rank
    # whatever the BLAS does, and 1/N of the Gram work.
    s = -(-p // n)
    lo, hi = min(r * s, p), min((r + 1) * s, p)
    gram = gram_matrix(every[:, lo:hi]).to(torch.float64)  # one dtype on every rank
    comm.run("all_reduce of the partial Gram matrices", dist.all_reduce, gram)
    gram = gram.cpu()
    decision = decide(gram, tau, rule, verdicts, options)
    weighted_sum(every, decision.weights, out)
    return decision, out, gram


def check_method(method: object) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method  # type: ignore[return-value]


def _check_out(out: Tensor | None, rows: Tensor) -> Tensor:
    p = rows.shape[1]
    if out is None:
        return rows.new_empty(p)
    if not isinstance(out, Tensor) or out.shape != (p,) or out.dtype != rows.dtype \
            or out.device != rows.device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous [{p}] tensor of dtype {rows.dtype} on {rows.device}"
        )
    return out


def run_protocol(local_grads: Tensor, tau: float, rule: str, comm: Comm, *, method: str = "sharded",
                 check: bool = True, layout: Sequence[Sequence[int]] | None = None,
                 out: Tensor | None = None, workspace: Workspace | None = None,
                 gather_if_skipped: bool = True, chunk_elements: int = CHUNK_ELEMENTS,
                 verdicts: np.ndarray | None = None, rule_options: Mapping | None = None,
                 gather: str = "auto") -> FilterResult:
    """The protocol behind :func:`filter_gradients_distributed`, for front ends that hold
    their own :class:`Comm`. ``layout`` (parameter shapes) joins the cross-rank check.
    ``gather_if_skipped=False`` saves the final gather on skipped steps (the direction is
    then returned as zeros: the optimizer will not use it). ``verdicts`` (bool [N·m], the
    same on every rank) come from a blind control (:mod:`gaf.controls`); ``rule_options``
    are the rule's options. ``gather`` picks how the filtered blocks are gathered:
    "broadcast" (N concurrent broadcasts), "all_gather", or "auto" (broadcasts on CPU
    tensors, where gloo's all_gather is 2-3x slower, all_gather elsewhere)."""
    rows = check_grads(local_grads)
    tau, rule, method = check_tau(tau), check_rule(rule), check_method(method)
    if rows.dtype not in DTYPE_CODES:
        raise TypeError(f"unsupported gradient dtype {rows.dtype}")
    if not rows.is_contiguous():
        rows = rows.contiguous()
    m, p = rows.shape
    out = _check_out(out, rows)
    ws = workspace if workspace is not None else Workspace()
    if check:
        values = step_fields(p, m, rows.dtype, rule, tau, method, layout, rule_options)
        check_settings(comm, values, rows.device, "the GAF exchange")
    used = method
    if comm.size == 1:
        gram = gram_matrix(rows).to("cpu", torch.float64)
        decision = decide(gram, tau, rule, verdicts, rule_options)
        weighted_sum(rows, decision.weights, out)
    elif method == "sharded" and comm.backend not in _NO_ALL_TO_ALL:
        try:
            decision, out, gram = _sharded(rows, comm, tau, rule, ws, out, gather_if_skipped,
                                     chunk_elements, verdicts, rule_options, gather)
        except AllToAllUnsupported as exc:
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
            decision, out, gram = _allgather(rows, comm, tau, rule, ws, out, chunk_elements,
                                             verdicts, rule_options, gather)
    else:
        used = "allgather"
        decision, out, gram = _allgather(rows, comm, tau, rule, ws, out, chunk_elements,
                                         verdicts, rule_options, gather)
    result = result_from_decision(decision, out, tau, rule)
    result.extra.update(
        method=used,
        world_size=comm.size,
        rank=comm.rank,
        rows_per_rank=m,
        local_rows=slice(comm.rank * m, (comm.rank + 1) * m),
        gram=gram,  # the all-reduced Gram matrix, on the host: the same bits on every rank
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
    out: Tensor | None = None,
    workspace: Workspace | None = None,
    verdicts: np.ndarray | None = None,
    rule_options: Mapping | None = None,
    gather: str = "auto",
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
        out: optional contiguous [P] tensor to write the direction into.
        workspace: a :class:`Workspace` to keep buffers in between calls (saves
            allocating about m·P elements per call).
        verdicts, rule_options, gather: as for :func:`run_protocol`.

    Returns:
        A :class:`~gaf.core.FilterResult` over all N·m micro-gradients in rank-major order
        (rank r's rows are ``result.extra["local_rows"]``), identical on every rank, whose
        ``grad`` [P] lives on ``local_grads.device``.
    """
    comm = Comm(group, timeout)
    return run_protocol(local_grads, tau, rule, comm, method=method, check=check, out=out,
                        workspace=workspace, verdicts=verdicts, rule_options=rule_options,
                        gather=gather)
