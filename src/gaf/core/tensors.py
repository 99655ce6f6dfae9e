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


def gram_matrix(grads: Tensor) -> Tensor:
    """G = X Xᵀ for X [M, P], accumulated in at least float32 (float64 for half precision).

    Non-finite entries are kept: a row with inf/NaN yields non-finite entries in its own
    row and column only, which the decision treats as "agrees with nothing".
    """
    x = grads.to(gram_dtype(grads.dtype))
    return x @ x.T


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """D(a, b) = 1 - a·b / (|a| |b|) for two flat tensors of equal length, clamped to [0, 2].

    Computed in float64 when inputs are half precision (float32 otherwise). Returns 2 when
    either vector has zero norm or is not finite: such a vector agrees with nothing.
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
    dtype = gram_dtype(torch.promote_types(a.dtype, b.dtype))
    a64, b64 = a.to(dtype), b.to(dtype)
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
