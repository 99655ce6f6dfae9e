"""One flat gradient's share of the sharded protocol, split into the phases a hook needs.

The DDP hook sees a step's gradient one bucket at a time. For each bucket (m = 1 row per
rank) :class:`ShardExchange` runs the steps of :mod:`gaf.distributed.protocol` that touch
data, with the decision left to the caller:

1. :meth:`start`: ``all_to_all`` of the bucket's blocks (block-cyclic
   :class:`~gaf.distributed.protocol.ShardPlan`), issued asynchronously so that it overlaps
   the rest of backward; rank r receives block r of every rank's bucket.
2. :meth:`poll` / :meth:`gram`: once the exchange has landed, this rank's partial Gram
   matrix of its blocks, [N, N], accumulated in float64 (the per-chunk products in float32,
   float64 for half buckets, as :func:`gaf.core.gram_matrix`).
3. :meth:`finish`: after the caller's decision, rank r's blocks of Σ w_i g_i, written
   straight into ``out`` (the bucket itself: its own values were sent in step 1 and are
   no longer needed), then gathered into every rank's ``out``.

The gather (``gather="auto"``) is N concurrent broadcasts on CPU tensors (gloo's all_gather
is 2-3x slower for the same bytes) and ``all_gather`` of equal blocks elsewhere: the
collectives NCCL has. ``gather="all_gather"`` forces the latter (how gloo tests it).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from gaf.core import gram_matrix, weighted_sum
from gaf.distributed.comm import Comm, Workspace, all_gather_flat
from gaf.distributed.protocol import CHUNK_ELEMENTS, GATHERS, ShardPlan


class ShardExchange:
    """The all_to_all, partial Gram and gather of one flat tensor ``flat`` [P]."""

    def __init__(self, flat: Tensor, comm: Comm, workspace: Workspace, key: str,
                 chunk_elements: int = CHUNK_ELEMENTS, gather: str = "auto"):
        if flat.dim() != 1 or not flat.is_contiguous():
            raise ValueError("a shard exchange needs a flat contiguous tensor")
        self.flat, self.comm = flat, comm
        if gather not in GATHERS:
            raise ValueError(f"unknown gather {gather!r}; choose one of {', '.join(GATHERS)}")
        # Broadcasts on CPU tensors ("auto"), all_gather elsewhere (NCCL's ring-optimal one).
        self.by_broadcast = gather == "broadcast" or (gather == "auto"
                                                      and flat.device.type == "cpu")
        n = comm.size
        self.plan = ShardPlan.make(flat.numel(), n, chunk_elements)
        self.recv = workspace.get(key, self.plan.chunks * n * self.plan.block, flat.dtype,
                                  flat.device)
        self.workspace, self.key = workspace, key
        self.tail: Tensor | None = None  # the padded short chunk's gather (all_gather only)
        self.works: list = []
        self.shards: list[Tensor] = []
        self.partial: Tensor | None = None
        self.since = 0.0

    def start(self) -> None:
        """Issue the all_to_all of every chunk (asynchronously)."""
        n, r, b = self.comm.size, self.comm.rank, self.plan.block
        self.since = time.monotonic()
        for c in range(self.plan.chunks):
            base, lens = self.plan.chunk(c)
            send = self.flat[base : base + sum(lens)]
            received = self.recv[c * n * b : c * n * b + n * lens[r]]
            splits = {}
            if any(length != b for length in lens):
                splits = dict(output_split_sizes=[lens[r]] * n, input_split_sizes=lens)
            self.works.append(self.comm.start("all_to_all of a bucket's shards",
                                              dist.all_to_all_single, received, send, **splits))
            self.shards.append(received.view(n, lens[r]))  # row i: rank i's block r

    def poll(self) -> bool:
        """Compute the partial Gram if the exchange has landed; never blocks."""
        if self.partial is None and all(w is None or w.is_completed() for w in self.works):
            self.gram()
        return self.partial is not None

    def gram(self) -> Tensor:
        """Wait for the exchange; this rank's partial Gram [N, N] in float64."""
        if self.partial is None:
            self.comm.wait("all_to_all of a bucket's shards", self.works, self.since)
            total = None
            for shard in self.shards:
                part = gram_matrix(shard).to(torch.float64)
                total = part if total is None else total.add_(part)
            self.partial = total
        return self.partial

    def finish(self, weights: np.ndarray, out: Tensor) -> list:
        """Write rank r's blocks of Σ w_i g_i into ``out`` and start gathering the others;
        returns the works (wait for them, then call :meth:`after_gather`)."""
        n, r, b = self.comm.size, self.comm.rank, self.plan.block
        by_broadcast = self.by_broadcast
        works, self._after = [], []
        what = "gather of a bucket's filtered shards"
        for c, shard in enumerate(self.shards):
            base, lens = self.plan.chunk(c)
            lo = base + r * b
            total = sum(lens)
            if by_broadcast:
                weighted_sum(shard, weights, out[lo : lo + lens[r]])
                for j, length in enumerate(lens):
                    if length:
                        part = out[base + j * b : base + j * b + length]
                        works.append(self.comm.start(what, dist.broadcast, part,
                                                     src=self.comm.global_rank(j)))
                continue
            if total == n * b:  # all_gather of equal blocks, straight into ``out``
                target = out[base : base + total]
                weighted_sum(shard, weights, target[r * b : (r + 1) * b])
                piece = target[r * b : (r + 1) * b]
            else:  # the short last chunk: gather padded blocks, keep the prefix
                self.tail = target = self.workspace.get(self.key + "/tail", n * b, out.dtype,
                                                        out.device)
                piece = target[r * b : (r + 1) * b]
                weighted_sum(shard, weights, piece[: lens[r]])
                piece[lens[r] :].zero_()
                # Only the trailing blocks are short, so the first ``total`` elements of
                # the padded gather are the chunk.
                self._after.append((out[base : base + total], total))
            works.append(self.comm.start(what, all_gather_flat, target, piece))
        return works

    def after_gather(self) -> None:
        """Copy the short last chunk out of its padded gather buffer."""
        for dst, total in self._after:
            dst.copy_(self.tail[:total])
