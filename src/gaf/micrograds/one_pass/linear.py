"""Per-layer algebra of the one-pass mode: micro-batch Gram pieces and weighted gradients.

A batch of B samples is split into M contiguous micro-batches (as ``torch.tensor_split``
does). For one layer, ``x`` is what its forward saw and ``delta`` the gradient of
L = Σ_i L_i with respect to its output; since L_j does not depend on the samples of
micro-batch i ≠ j, the rows of ``delta`` belonging to micro-batch i are exactly the output
gradients of L_i. Each handler below turns (x, delta) into

* the layer's contribution to the Gram matrix, G_layer[i, j] = <g_i, g_j> restricted to
  this layer's parameters, and
* later, once the rule has chosen weights w, the layer's part of Σ_i w_i g_i.

Per layer kind (R: rows = samples × positions, in/out: feature sizes, P_l = in·out):

Linear      g_i = Δ_iᵀ X_i (rows of micro-batch i). Two ways to its Gram piece:
            "ghost":        G[i, j] = Σ_{a∈i, b∈j} (x_a·x_b)(δ_a·δ_b), i.e. the block sums
                            of (X Xᵀ) ∘ (Δ Δᵀ): R²·(in + out) flops, never forms a g_i;
                            the direction is then (w-scaled Δ)ᵀ X over the rows with
                            w ≠ 0 (at most R·P_l).
            "materialised": all g_i as [M, out, in] blocks (bmm, R·P_l) and their Gram
                            (M²·P_l). The blocks are kept for the direction (M·P_l held
                            until the decision, direction M·P_l) when they are smaller
                            than the layer's rows or fit the keep budget; otherwise
                            ("recomputed") only their sum is kept, the blocks pass through
                            the cache a chunk of output features at a time, and the
                            direction recomputes the micro-batches whose weight is not the
                            most common one (:class:`Weights`; at most R/2 rows, none when
                            all agree).
            The cheaper by flop count is taken, layer by layer.
Conv1/2/3d  materialised, as Linear (:mod:`gaf.micrograds.one_pass.conv`).
Embedding   g_i scatters micro-batch i's rows of Δ into the vocabulary: dense [M, V, D]
            blocks when V ≤ R (kept if smaller than the rows), compact [M, U, D] blocks
            over the U distinct indices of the batch (a sort, then M²·U·D), or ghost
            ([idx_a = idx_b] ∘ Δ Δᵀ, R²·D), whichever is cheaper. Unless kept, the
            direction is one index_add of w-scaled rows (R·D).
Norms       LayerNorm, GroupNorm, BatchNorm affine parameters (:mod:`gaf.micrograds.one_pass.conv`).
Biases      Σ of micro-batch i's rows of δ; always kept ([M, out]).

Memory: see :mod:`~gaf.micrograds.one_pass.engine`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gaf.micrograds.one_pass.pieces import (
    Budget,
    Captured,
    MicroBatches,
    Weights,
    common_dtype,
    gram,
    self_products,
)

# Numbers in one chunk of [M, c, in] blocks of a Linear layer that is not kept (about 4 MB
# in float32: a few chunks fit the caches of current CPUs).
CHUNK_NUMBERS = 1 << 20

# -- Linear and Embedding: row-wise layers -----------------------------------------------------


def _rows(cap: Captured, mb: MicroBatches) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Every call's (input rows, delta rows, micro-batch id per row), concatenated, and
    whether the rows are M equal runs in micro-batch order (one call, equal sizes)."""
    xs, ds, ids = [], [], []
    for x, d in zip(cap.saved, cap.deltas, strict=True):
        if d is None:
            continue
        per_sample = d[0].numel() // d.shape[-1] if d.dim() > 1 else 1
        if cap.kind == "embedding":
            xs.append(x.reshape(-1))
        else:
            xs.append(x.reshape(-1, x.shape[-1]))
        ds.append(d.reshape(-1, d.shape[-1]))
        ids.append(mb.row_ids(per_sample))
    if len(xs) == 1:
        return xs[0], ds[0], ids[0], mb.equal
    return torch.cat(xs), torch.cat(ds), torch.cat(ids), False


def linear_pieces(cap: Captured, mb: MicroBatches, budget: Budget) -> None:
    x, d, ids, regular = _rows(cap, mb)
    x, d = common_dtype(x, d)
    dtype, m, r = d.dtype, mb.m, x.shape[0]
    if "bias" in cap.params:
        if regular:
            bias = d.reshape(m, r // m, d.shape[1]).sum(1)
        else:
            bias = torch.zeros(m, d.shape[1], dtype=dtype, device=d.device).index_add_(0, ids, d)
        cap.kept["bias"], cap.plan["bias"] = bias, "kept"
        cap.add(gram(bias))
    if "weight" not in cap.params:
        cap.release()
        return
    n_in, n_out = x.shape[1], d.shape[1]
    p_l = n_in * n_out
    # Keep the blocks when they are smaller than the rows a recomputation would hold
    # until the decision, or when the budget has room for them.
    keep = m * p_l <= r * (n_in + n_out) or budget.fits(m * p_l) or budget.materialise
    ghost = r * r * (n_in + n_out) + r * p_l
    # Blocks, their Gram, then the direction: from the kept blocks, or by recomputing at
    # most half of the rows (see Weights).
    materialised = r * p_l + m * m * p_l + (m * p_l if keep else r * p_l // 2)
    if ghost < materialised and not budget.materialise:
        xx, dd = self_products(x, dtype), self_products(d, dtype)
        acc = torch.promote_types(xx.dtype, dd.dtype)
        prod = xx.to(acc) * dd.to(acc)
        cap.add(mb.block_sum(prod, ids, regular))
        cap.plan["weight"] = "ghost"
        cap.extra["rows"] = (x, d, ids)
    elif keep:
        if not m * p_l <= r * (n_in + n_out):
            budget.take(m * p_l)
        blocks = _linear_blocks(x, d, ids, regular, m, slice(None))
        cap.add(gram(blocks))
        cap.kept["weight"], cap.plan["weight"] = blocks, "kept"
    else:
        # Output features a chunk at a time, so that each chunk's [M, c, in] blocks stay in
        # cache for their Gram and their sum: the blocks as a whole are M times the layer.
        step = max(1, CHUNK_NUMBERS // (m * n_in))
        total = torch.empty(n_out, n_in, dtype=dtype, device=d.device)
        for start in range(0, n_out, step):
            blocks = _linear_blocks(x, d, ids, regular, m, slice(start, start + step))
            cap.add(gram(blocks))
            torch.sum(blocks, 0, out=total[start:start + step])
        # The direction recomputes only the micro-batches off the most common weight.
        cap.plan["weight"] = "recomputed"
        cap.extra.update(rows=(x, d, ids), total=total)
    cap.release()


def _linear_blocks(x: Tensor, d: Tensor, ids: Tensor, regular: bool, m: int,
                   features: slice) -> Tensor:
    """[M, out', in]: each micro-batch's weight gradient for the output ``features``."""
    d = d[:, features]
    if regular:
        r = x.shape[0]
        return torch.bmm(d.reshape(m, r // m, -1).transpose(1, 2), x.reshape(m, r // m, -1))
    return torch.stack([d[ids == i].T @ x[ids == i] for i in range(m)])


def _outer(x: Tensor, d: Tensor, out: Tensor, add: bool) -> None:
    if add:
        out.addmm_(d.T, x)
    else:
        torch.mm(d.T, x, out=out)


def linear_direction(cap: Captured, weights: Weights, out: Tensor) -> None:
    """out = Σ_rows w_{micro-batch(row)} δ_row x_rowᵀ: the gradient of Σ_i w_i L_i."""
    x, d, ids = cap.extra.pop("rows")
    weights.products(x, d, ids, cap.extra.pop("total", None), _outer, out)


def embedding_pieces(cap: Captured, mb: MicroBatches, budget: Budget) -> None:
    module: nn.Embedding = cap.module
    idx, d, ids, regular = _rows(cap, mb)
    if module.padding_idx is not None:  # the padding row receives no gradient
        d = torch.where((idx == module.padding_idx)[:, None],
                        torch.zeros((), dtype=d.dtype, device=d.device), d)
    m, r, dim = mb.m, d.shape[0], d.shape[1]
    vocab = module.num_embeddings
    # Three ways, by cost: dense [M, V, D] blocks (M²·V·D; no sort) when the vocabulary is
    # no larger than the rows, else compact blocks over the U distinct indices (a sort,
    # then M²·U·D), or the ghost product [idx_a = idx_b] ∘ Δ Δᵀ (R²·D).
    if budget.materialise or (vocab <= r and m * m * vocab <= r * r):
        blocks = torch.zeros(m * vocab, dim, dtype=d.dtype, device=d.device)
        blocks.index_add_(0, ids * vocab + idx, d)
        cap.add(gram(blocks.reshape(m, vocab * dim)))
        if blocks.numel() <= d.numel() + idx.numel() or budget.materialise:
            cap.kept["weight"], cap.plan["weight"] = blocks.reshape(m, vocab, dim), "kept"
            cap.release()
            return
        cap.plan["weight"] = "dense"
    elif r * r < m * m * min(vocab, r):
        dd = self_products(d, d.dtype)
        same = (idx[:, None] == idx[None, :]).to(dd.dtype)
        cap.add(mb.block_sum(same * dd, ids, regular))
        cap.plan["weight"] = "ghost"
    else:
        uniq, inverse = torch.unique(idx, return_inverse=True)
        u = uniq.numel()
        compact = torch.zeros(m * u, dim, dtype=d.dtype, device=d.device)
        compact.index_add_(0, ids * u + inverse, d)
        cap.add(gram(compact.reshape(m, u * dim)))
        cap.plan["weight"] = "compact"
    cap.extra["rows"] = (idx, d, ids)
    cap.release()


def embedding_direction(cap: Captured, weights: Weights, out: Tensor) -> None:
    idx, d, ids = cap.extra.pop("rows")

    def scatter(rows: Tensor, deltas: Tensor, out: Tensor, add: bool) -> None:
        (out if add else out.zero_()).index_add_(0, rows, deltas)

    weights.products(idx, d, ids, None, scatter, out)
