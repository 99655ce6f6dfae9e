"""One flat gradient's share of the sharded protocol, split into the phases a hook needs.

The DDP hook sees a step's gradient one bucket at a time (m = 1 row per rank), so
:class:`ShardExchange` runs the data steps of :mod:`gaf.distributed.protocol` separately,
the decision left to the caller: :meth:`start` issues the ``all_to_all`` of the bucket's
blocks asynchronously (it overlaps the rest of backward); :meth:`poll` / :meth:`gram` form
this rank's partial Gram [N, N] in float64 once it has landed; :meth:`finish` writes rank
r's blocks of Σ w_i g_i straight into ``out`` (the bucket: its own values were already
sent) and gathers the others (:func:`~gaf.distributed.protocol.gather_filtered`).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from gaf.core import gram_matrix
from gaf.distributed.comm import Comm, Workspace
from gaf.distributed.protocol import CHUNK_ELEMENTS, ShardPlan, gather_by_broadcast, gather_filtered


class ShardExchange:
    """The all_to_all, partial Gram and gather of one flat tensor ``flat`` [P]."""

    def __init__(self, flat: Tensor, comm: Comm, workspace: Workspace, key: str,
                 chunk_elements: int = CHUNK_ELEMENTS, gather: str = "auto"):
        if flat.dim() != 1 or not flat.is_contiguous():
            raise ValueError("a shard exchange needs a flat contiguous tensor")
        self.flat, self.comm = flat, comm
        self.by_broadcast = gather_by_broadcast(flat.device, gather)
        n = comm.size
        self.plan = ShardPlan.make(flat.numel(), n, chunk_elements)
        self.recv = workspace.get(key, self.plan.chunks * n * self.plan.block, flat.dtype,
                                  flat.device)
        self.workspace, self.key = workspace, key
        self._after: list = []  # (dst, src) copies out of the padded short chunk's gather
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
        n, b = self.comm.size, self.plan.block
        works, self._after = gather_filtered(
            self.comm, self.plan, self.shards, weights, out, self.by_broadcast,
            lambda: self.workspace.get(self.key + "/tail", n * b, out.dtype, out.device),
            "gather of a bucket's filtered shards")
        return works

    def after_gather(self) -> None:
        """Copy the short last chunk out of its padded gather buffer."""
        for dst, src in self._after:
            dst.copy_(src)
