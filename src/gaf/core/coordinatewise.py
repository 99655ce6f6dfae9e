"""Coordinate-wise median and trimmed mean (Yin et al., ICML 2018, "Byzantine-robust
distributed learning: towards optimal statistical rates") over a [M, P] stack.

Per coordinate c, over the valid rows' values x_1[c] … x_n[c] sorted ascending::

    median:        the middle value (n odd) or the mean of the two middle values (n even)
    trimmed mean:  drop the b largest and b smallest values, average the n - 2b left

Not a weighted sum of whole rows, so not decided from the Gram matrix: across ranks they
need an all-gather (:mod:`gaf.distributed.coordinatewise`); they are here as baselines.
Invalid rows are dropped whole before sorting; with n <= 2b valid rows, b shrinks to
(n - 1) // 2 (the median). The sort is stable and the averages run in a fixed order, so
ranks holding the same rows compute the same bits. ``weights[i]`` is row i's share of the
kept entries, ``anchor`` the row with the largest share, ``distances`` the cosine
distance from the result to each row (2 for invalid rows).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gaf.core.decision import Decision, FilterResult, result_from_decision
from gaf.core.distance import valid_norm_sq
from gaf.core.tensors import check_grads, direction_buffer

COORDINATEWISE_RULES: tuple[str, ...] = ("median", "trimmed-mean")


def check_trim(rows: int, trim: object) -> int:
    """Validate the trimmed mean's b (values dropped at each end) for ``rows`` rows."""
    if isinstance(trim, bool) or not isinstance(trim, (int, np.integer)):
        raise TypeError(f"trimmed-mean's trim must be an int, got {type(trim).__name__}")
    if trim < 0:
        raise ValueError(f"trimmed-mean's trim must be at least 0, got {trim}")
    if rows <= 2 * trim:
        raise ValueError(
            f"trimmed-mean with trim = {trim} drops {2 * trim} values per coordinate and "
            f"needs more than that many micro-gradients, got M = {rows}"
        )
    return int(trim)


def _valid_mask(grads: Tensor) -> np.ndarray:
    # One reduction over the stack and one small device→host copy. Squared norms in
    # float64: finite float32 entries can neither overflow nor underflow to zero there.
    norm_sq = torch.linalg.vector_norm(grads, dim=1, dtype=torch.float64).square()
    return torch.stack([torch.isfinite(norm_sq), valid_norm_sq(norm_sq)]).cpu().numpy()


def coordinatewise(grads: Tensor, trim: int | None, out: Tensor) -> Decision:
    """Write the coordinate-wise median (``trim=None``) or trimmed mean of the valid rows
    of ``grads`` [M, P] into ``out`` [P]; return the statistics (module docstring)."""
    m, p = grads.shape
    finite, valid = _valid_mask(grads)
    idx = np.flatnonzero(valid)
    n = idx.size
    if n == 0:
        out.zero_()
        return Decision(np.zeros(m, dtype=bool), np.zeros(m), np.full(m, 2.0), -1, valid,
                        finite)
    rows = grads[torch.from_numpy(idx).to(grads.device)] if n < m else grads
    values, order = torch.sort(rows, dim=0, stable=True)
    if trim is None:
        lo, hi = (n - 1) // 2, n // 2 + 1  # one middle value, or the two middle values
    else:
        b = min(trim, (n - 1) // 2)
        lo, hi = b, n - b
    band = values[lo:hi]
    if hi - lo == 1:
        out.copy_(band[0])
    else:
        torch.mean(band, dim=0, out=out)
    counts = torch.bincount(order[lo:hi].reshape(-1), minlength=n).cpu().numpy()
    share = np.zeros(m)
    share[idx] = counts / float((hi - lo) * p)
    direction = out.double()
    dots = (rows.double() @ direction).cpu().numpy()
    norms = (rows.double().norm(dim=1) * direction.norm()).cpu().numpy()
    distances = np.full(m, 2.0)
    safe = norms > 0
    cos = np.where(safe, dots / np.where(safe, norms, 1.0), 0.0)
    distances[idx] = np.clip(1.0 - cos, 0.0, 2.0)
    return Decision(share > 0, share, distances, int(np.argmax(share)), valid, finite)


def aggregate_coordinatewise(grads: Tensor, rule: str = "median", trim: int = 1,
                             out: Tensor | None = None) -> FilterResult:
    """The coordinate-wise ``rule`` ("median", or "trimmed-mean" dropping ``trim`` values
    at each end) over a [M, P] stack, as a :class:`~gaf.core.FilterResult`."""
    grads = check_grads(grads)
    if rule not in COORDINATEWISE_RULES:
        raise ValueError(f"unknown coordinate-wise rule {rule!r}; choose one of "
                         f"{', '.join(COORDINATEWISE_RULES)}")
    trim_used = check_trim(grads.shape[0], trim) if rule == "trimmed-mean" else None
    out = direction_buffer(grads, out)
    decision = coordinatewise(grads, trim_used, out)
    return result_from_decision(decision, out, 2.0, rule)
