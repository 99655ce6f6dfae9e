"""The data side of the filter: Gram matrices, distances and weighted sums of flat rows.

Everything here touches the micro-gradients themselves (O(M·P) work, on their device);
the decision made from the Gram matrix lives in :mod:`gaf.core.rules` (docs/design.md,
"The Gram idea").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from gaf.core.distance import ZERO_DISTANCE, valid_norm_sq


def check_grads(grads: object) -> Tensor:
    """Validate a [M, P] stack of micro-gradients."""
    if not isinstance(grads, Tensor):
        raise TypeError(f"grads must be a torch.Tensor of shape [M, P], got {type(grads).__name__}")
    if grads.dim() != 2:
        raise ValueError(
            f"grads must be 2-D [M, P] (one flat micro-gradient per row), got shape "
            f"{tuple(grads.shape)}"
        )
    if not grads.is_floating_point():
        raise TypeError(f"grads must be a floating tensor, got dtype {grads.dtype}")
    if grads.shape[0] == 0:
        raise ValueError("grads has no rows (M = 0): need at least one micro-gradient")
    return grads


def gram_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for the Gram matrix: float64 for half precision, else at least fp32."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float64
    return torch.float64 if dtype == torch.float64 else torch.float32


# A float32 sum of products is as good as its rounding only while no term over- or
# underflows. Squared norms inside this band guarantee that (an underflowed term is then
# below 2^-126 / 2^-60 of the total, and N ranks' partial sums stay far below float32's
# 2^128); outside it the products are recomputed in float64, whose range holds the square
# of any float32. Ordinary gradients never leave the band, so their bits do not change.
FLOAT32_SAFE_NORM_SQ = (2.0**-60, 2.0**100)


def float32_safe(norm_sq: float) -> bool:
    """Whether a float32 squared norm (or a product of such rows) can be trusted."""
    lo, hi = FLOAT32_SAFE_NORM_SQ
    return lo <= norm_sq <= hi  # False for NaN and inf too


def _needs_float64(diag: Tensor, x: Tensor) -> bool:
    """Whether a float32 Gram with this diagonal may have over- or underflowed (one sync)."""
    lo, hi = FLOAT32_SAFE_NORM_SQ
    outside = ~((diag >= lo) & (diag <= hi))
    if not bool(outside.any()):
        return False
    big = ~(diag <= hi)  # overflow, or an inf/NaN entry (then float64 keeps it non-finite)
    # A small diagonal is harmless when its row is exactly zero (common: a zero shard).
    return bool(big.any()) or bool(x[outside].ne(0).any())


def gram_matrix(grads: Tensor) -> Tensor:
    """G = X Xᵀ for X [M, P], accumulated in at least float32 (float64 for half precision).

    Float32 rows whose squared norm leaves :data:`FLOAT32_SAFE_NORM_SQ` (finite entries
    around 1e19 and up overflow, 1e-30 and below underflow to zero) get a float64 Gram
    instead, so a finite micro-gradient is never called non-finite or zero; this costs one
    host sync, which the decision right after needs anyway.

    Non-finite entries are kept: a row with inf/NaN yields non-finite entries in its own
    row and column only, which the decision treats as "agrees with nothing".
    """
    acc = gram_dtype(grads.dtype)
    x = grads.to(acc)
    gram = x @ x.T
    if acc == torch.float32 and _needs_float64(gram.diagonal(), x):
        x = grads.to(torch.float64)
        gram = x @ x.T
    return gram


def host_dot(a: Tensor, b: Tensor, *norms_sq: float) -> float:
    """a·b as a Python float, in the rows' dtype unless float32 may have over- or
    underflowed: when a·a (``norms_sq`` empty) or a given |a|², |b|² lies outside
    :data:`FLOAT32_SAFE_NORM_SQ`, it is recomputed in float64 (as :func:`gram_matrix`)."""
    value = float(a @ b)
    if a.dtype != torch.float32 or all(float32_safe(n) for n in norms_sq or (value,)):
        return value
    if not norms_sq and value == 0.0 and not bool(a.ne(0).any()):
        return value  # an exactly zero row
    return float(a.to(torch.float64) @ b.to(torch.float64))


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """D(a, b) = 1 - a·b / (|a| |b|) for two flat tensors of equal length, clamped to [0, 2].

    Computed in float64 (float32 products of finite rows can over- or underflow). Returns 2
    when either vector has zero norm or is not finite: such a vector agrees with nothing.
    """
    for name, v in (("a", a), ("b", b)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
        if not v.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {v.dtype}")
    if a.dim() != 1 or b.dim() != 1:
        raise ValueError(
            f"cosine_distance expects flat (1-D) tensors, got shapes {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    dot, na, nb = a64 @ b64, a64 @ a64, b64 @ b64
    ok = torch.isfinite(dot) & valid_norm_sq(na) & valid_norm_sq(nb)
    cos = dot / torch.sqrt(torch.where(ok, na * nb, torch.ones_like(na)))
    dist = torch.clamp(1.0 - cos, 0.0, 2.0)
    return torch.where(ok, dist, torch.full_like(dist, ZERO_DISTANCE))


def weighted_sum(rows: Sequence[Tensor] | Tensor, weights: np.ndarray, out: Tensor) -> Tensor:
    """out = Σ weights[i] · rows[i] over rows with non-zero weight, written in place.

    Rows with zero weight are never touched, so an inf/NaN in a rejected row cannot leak
    into the result (0 · inf would be NaN). Weights are host floats: no device sync. The
    first term is written with a multiply rather than added to zeros: one pass over P less,
    same bits (0 + w·x rounds exactly like w·x).
    """
    first = True
    for i, w in enumerate(weights.tolist()):
        if w == 0.0:
            continue
        if first:
            torch.mul(rows[i], w, out=out)
            first = False
        else:
            out.add_(rows[i].to(out.dtype), alpha=w)
    if first:
        out.zero_()
    return out


def direction_buffer(grads: Tensor, out: Tensor | None) -> Tensor:
    """``out`` checked against a [M, P] stack, or a new [P] tensor like its rows."""
    if out is None:
        return torch.empty(grads.shape[1], dtype=grads.dtype, device=grads.device)
    if out.shape != (grads.shape[1],) or out.device != grads.device:
        raise ValueError(
            f"out must have shape ({grads.shape[1]},) on {grads.device}, got "
            f"{tuple(out.shape)} on {out.device}"
        )
    return out
