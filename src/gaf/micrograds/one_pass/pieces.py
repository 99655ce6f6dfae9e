"""What every one-pass layer handler shares: the micro-batch split, the keep budget, the
step's weights, and one module's captured inputs and output gradients."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gaf.core import gram_dtype, gram_matrix


class MicroBatches:
    """B samples split into M contiguous micro-batches of sizes differing by at most one."""

    def __init__(self, total: int, m: int, device: torch.device):
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"num_micro_batches must be a positive int, got {m!r}")
        if m > total:
            raise ValueError(f"cannot split a batch of {total} samples into {m} micro-batches")
        q, r = divmod(total, m)
        self.sizes = [q + 1] * r + [q] * (m - r)  # the sizes torch.tensor_split gives
        self.m, self.total, self.equal, self.size = m, total, r == 0, q
        self.sample_ids = torch.repeat_interleave(
            torch.arange(m, device=device), torch.tensor(self.sizes, device=device))

        self._row_ids: dict[int, Tensor] = {1: self.sample_ids}

    def row_ids(self, per_sample: int) -> Tensor:
        """Micro-batch of each row when every sample has ``per_sample`` rows, sample-major."""
        if per_sample not in self._row_ids:
            self._row_ids[per_sample] = self.sample_ids.repeat_interleave(per_sample)
        return self._row_ids[per_sample]

    def segment_sum(self, t: Tensor) -> Tensor:
        """[B, ...] → [M, ...]: the sum over each micro-batch's samples."""
        if self.equal:
            return t.reshape(self.m, self.size, *t.shape[1:]).sum(1)
        out = torch.zeros(self.m, *t.shape[1:], dtype=t.dtype, device=t.device)
        return out.index_add_(0, self.sample_ids, t)

    def block_sum(self, p: Tensor, rows: Tensor, regular: bool) -> Tensor:
        """[R, R] → [M, M]: sums of the blocks whose rows/columns belong to micro-batches.
        ``regular``: the rows are M equal runs, one per micro-batch, in order."""
        r = p.shape[0]
        if regular:
            return p.reshape(self.m, r // self.m, self.m, r // self.m).sum((1, 3))
        s = F.one_hot(rows, self.m).to(p.dtype)
        return s.T @ p @ s


class Budget:
    """How many micro-gradient numbers the weight layers may keep until the decision (kept
    [M, P_l] blocks spare recomputing the weighted gradient; biases and norm parameters are
    always kept and not counted)."""

    def __init__(self, numbers: int, materialise: bool = False):
        self.left = numbers
        # Every layer's [M, P_l] blocks, for callers that want the micro-gradients
        # themselves (e.g. to feed the distributed protocol): no ghost products.
        self.materialise = materialise

    def fits(self, numbers: int) -> bool:
        return numbers <= self.left

    def take(self, numbers: int) -> bool:
        if numbers <= self.left:
            self.left -= numbers
            return True
        return False


def gram(rows: Tensor) -> Tensor:
    """[M, ...] micro-gradient blocks → their [M, M] Gram matrix in the accumulation dtype
    (:func:`gaf.core.gram_matrix`: float64 where float32 would over- or underflow)."""
    return gram_matrix(rows.reshape(rows.shape[0], -1))


def self_products(a: Tensor, dtype: torch.dtype) -> Tensor:
    """a aᵀ for the ghost products, in the accumulation dtype of ``dtype``; float32 rows
    whose products would over- or underflow are multiplied in float64 (as
    :func:`gaf.core.gram_matrix`), so the sum of the pieces may be float64."""
    acc = gram_dtype(dtype)
    if a.dtype == torch.float32 and acc == torch.float32:
        return gram_matrix(a)
    return (a @ a.T).to(acc)


class Weights:
    """The decision's weights w [M] in the forms the direction needs, made once a step.

    ``base`` is the most frequent weight c (the mean rule's 1/|S| when most micro-batches
    agree, else 0): a layer that kept the plain sum g = Σ_i g_i of its micro-gradients
    gets Σ_i w_i g_i = c·g + Σ_i (w_i - c) g_i, and recomputes only the micro-batches with
    w_i ≠ c, at most half of them (none when all agree). With a non-finite micro-batch
    c is 0: the sum would carry its inf.
    """

    def __init__(self, weights: np.ndarray, finite: bool, device: torch.device):
        self.host = weights
        self.used = weights != 0
        self.all_used = bool(self.used.all())
        values, counts = np.unique(weights, return_counts=True)
        self.base = float(values[np.argmax(counts)]) if finite else 0.0
        self.device = device
        self._tensors: dict = {}

    def tensor(self, dtype: torch.dtype, base: float = 0.0) -> Tensor:
        """w - base [M] as a device tensor of ``dtype``."""
        key = (dtype, base)
        if key not in self._tensors:
            self._tensors[key] = torch.from_numpy(self.host - base).to(self.device, dtype)
        return self._tensors[key]

    def kept(self, blocks: Tensor, out: Tensor) -> Tensor:
        """out = Σ_i w_i · blocks[i] over the micro-batches with w_i ≠ 0 only, so an inf/NaN
        in a rejected block never meets its zero weight (0 · inf = NaN)."""
        rows = blocks.reshape(blocks.shape[0], -1)
        w = self.tensor(blocks.dtype)
        if not self.all_used:
            idx = torch.from_numpy(np.flatnonzero(self.used)).to(blocks.device)
            rows, w = rows.index_select(0, idx), w.index_select(0, idx)
        if out.dtype == rows.dtype and out.is_contiguous():
            return torch.mm(w.reshape(1, -1), rows, out=out.view(1, -1))
        return out.copy_((w @ rows).reshape(out.shape))

    def products(self, x: Tensor, d: Tensor, ids: Tensor, total: Tensor | None, product,
                 out: Tensor) -> Tensor:
        """out = Σ_i w_i g_i where g_i = Σ over the rows of micro-batch i of a product that
        is linear in d; ``product(x, d, out, add)`` writes (or with ``add`` adds) it.

        ``ids``: micro-batch of each row of x and d; ``total``: Σ_i g_i if kept, else None.
        Only rows whose coefficient is non-zero are read.
        """
        base = self.base if total is not None else 0.0
        coef_host = self.host - base
        if base != 0.0:
            torch.mul(total, base, out=out)
        if not coef_host.any():
            return out if base != 0.0 else out.zero_()
        coef = self.tensor(d.dtype, base)[ids]
        if not coef_host.all():
            rows = torch.nonzero(coef).flatten()
            x, d, coef = x.index_select(0, rows), d.index_select(0, rows), coef[rows]
        product(x, d * coef.reshape(-1, *([1] * (d.dim() - 1))), out, base != 0.0)
        return out


@dataclass
class Captured:
    """One module's pieces for the current step: saved forward inputs and their deltas."""

    module: nn.Module
    name: str
    kind: str
    params: dict  # parameter name → tensor, the trainable ones this module owns
    saved: list = field(default_factory=list)
    deltas: list = field(default_factory=list)
    gram: Tensor | None = None
    kept: dict = field(default_factory=dict)  # parameter name → [M, *shape] micro-gradients
    plan: dict = field(default_factory=dict)  # parameter name → how its pieces are computed
    extra: dict = field(default_factory=dict)

    def add(self, g: Tensor) -> None:
        if self.gram is None:
            self.gram = g
        elif g.dtype != self.gram.dtype:  # a float64 piece (gram_matrix's fallback)
            self.gram = self.gram.to(torch.promote_types(g.dtype, self.gram.dtype)) + g
        else:
            self.gram.add_(g)

    def release(self) -> None:
        self.saved, self.deltas = [], []


def common_dtype(x: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """x and d in one dtype (under autocast they may differ): the wider of the two."""
    if x.dtype == d.dtype or not x.is_floating_point():
        return x, d
    dtype = torch.promote_types(x.dtype, d.dtype)
    return x.to(dtype), d.to(dtype)


