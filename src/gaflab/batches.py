"""Micro-batch order for one epoch: random, class-balanced, or one source per micro-batch.

:func:`epoch_batches` returns the sample indices of an epoch as ``[steps, M, b]`` (CPU,
int64): ``steps`` optimizer steps of ``M`` micro-batches of ``b`` samples. Its only
randomness is the ``generator`` passed in, so the same generator state gives the same
batches, whatever the method trained on them.

Orders:

random          a permutation of all samples cut into micro-batches; the last
                ``N mod (M b)`` samples of the permutation sit the epoch out.
class-balanced  every micro-batch holds ``b / K`` samples of each (observed) class, drawn
                without replacement; the epoch ends when the smallest class runs out.
per source      every micro-batch holds samples of one source only (``sources[i]`` is the
                source of sample i), as when each micro-batch comes from one shard,
                annotator or worker. Each source is shuffled and cut into micro-batches (its
                last ``n_s mod b`` samples sit the epoch out), the micro-batches of all
                sources are shuffled together and grouped ``M`` per step (the last
                ``total mod M`` micro-batches sit the epoch out). What sits out changes from
                epoch to epoch with the shuffles. A step may mix sources; a micro-batch never.

The experiment loop runs in one process, so there are no ranks to give sources to:
``examples/train_distributed.py`` loads and shards its own data and does not use these
orders (each rank would take the micro-batches of its own sources).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from gaflab.config import TrainConfig
    from gaflab.prepare import PreparedData


def epoch_batches(
    labels: Tensor,
    num_classes: int,
    micro_batch_size: int,
    num_micro_batches: int,
    class_balanced: bool,
    generator: torch.Generator,
    sources: Tensor | None = None,
) -> Tensor:
    """Indices for one epoch, shape ``[steps, M, micro_batch_size]`` (CPU, int64).

    ``sources`` (int64 ``[N]``, source ids ``0..S-1``) asks for micro-batches drawn from one
    source each; it cannot be combined with ``class_balanced``.
    """
    labels = labels.cpu()
    m, b = num_micro_batches, micro_batch_size
    if sources is not None:
        if class_balanced:
            raise ValueError("micro-batches cannot be both class-balanced and one source each")
        return _per_source(sources.cpu(), labels.numel(), b, m, generator)
    if not class_balanced:
        return _random(labels.numel(), b, m, generator)
    return _class_balanced(labels, num_classes, b, m, generator)


def _random(n: int, b: int, m: int, generator: torch.Generator) -> Tensor:
    steps = n // (m * b)
    perm = torch.randperm(n, generator=generator)
    return perm[: steps * m * b].view(steps, m, b)


def _class_balanced(labels: Tensor, num_classes: int, b: int, m: int,
                    generator: torch.Generator) -> Tensor:
    per_class = b // num_classes
    if per_class * num_classes != b:
        raise ValueError(f"micro_batch_size {b} is not a multiple of {num_classes} classes")
    members = [torch.nonzero(labels == c).reshape(-1) for c in range(num_classes)]
    n_micro = min(len(x) for x in members) // per_class
    steps = n_micro // m
    if steps == 0:
        raise ValueError(
            f"class-balanced micro-batches of {per_class} per class: some class has fewer "
            f"than {per_class * m} samples, not enough for one step"
        )
    cols = []
    for x in members:
        shuffled = x[torch.randperm(len(x), generator=generator)]
        cols.append(shuffled[: steps * m * per_class].view(steps * m, per_class))
    micro = torch.cat(cols, dim=1)  # [steps*M, K*per_class]
    # Shuffle within each micro-batch so the samples of a class are not contiguous.
    inner = torch.argsort(torch.rand(micro.shape, generator=generator), dim=1)
    return micro.gather(1, inner).view(steps, m, b)


def _per_source(sources: Tensor, n: int, b: int, m: int, generator: torch.Generator) -> Tensor:
    sources = sources.reshape(-1)
    if sources.numel() != n:
        raise ValueError(f"{sources.numel()} source ids for {n} samples")
    if sources.dtype in (torch.bool, torch.float16, torch.float32, torch.float64):
        raise ValueError(f"source ids must be integers, got {sources.dtype}")
    if n and int(sources.min()) < 0:
        raise ValueError("source ids must be >= 0")
    num_sources = int(sources.max()) + 1 if n else 0
    pieces = []
    for s in range(num_sources):  # fixed order: reproducible draws
        members = torch.nonzero(sources == s).reshape(-1)
        k = members.numel() // b
        shuffled = members[torch.randperm(members.numel(), generator=generator)]
        pieces.append(shuffled[: k * b].view(k, b))
    micro = torch.cat(pieces) if pieces else torch.empty(0, b, dtype=torch.int64)
    steps = micro.shape[0] // m
    if steps == 0:
        raise ValueError(
            f"no source holds {b} samples often enough to fill one step of {m} micro-batches "
            f"of one source each ({micro.shape[0]} such micro-batches in all)"
        )
    order = torch.randperm(micro.shape[0], generator=generator)[: steps * m]
    return micro[order].view(steps, m, b)


def batch_sources(cfg: TrainConfig, data: PreparedData) -> Tensor | None:
    """The per-sample source ids when ``cfg`` asks for micro-batches of one source each."""
    if not cfg.per_source_batches:
        return None
    if data.train_source is None:
        raise ValueError(
            f"noise_sources={cfg.noise_sources} asks for micro-batches of one source each, "
            "but the prepared data carries no source ids (PreparedData.train_source)"
        )
    return data.train_source
