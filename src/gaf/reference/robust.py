"""Float64 references of the robust rules (:mod:`gaf.core.robust`,
:mod:`gaf.core.coordinatewise`), with Python loops over coordinates (see :mod:`gaf.reference`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gaf.core import valid_vector


def reference_multi_krum(grads: Tensor, f: int = 1, m: int | None = None) -> dict:
    """dict(accepted: list[bool], scores: dict[int, float], grad: Tensor float64)."""
    rows = [r.double() for r in grads]
    keep = len(rows) - f if m is None else m
    idx = [i for i, r in enumerate(rows) if valid_vector(r)]
    n = len(idx)
    k = min(max(1, n - f - 2), n - 1) if n > 1 else 0
    scores = {}
    for i in idx:
        dists = sorted(float(((rows[i] - rows[j]) ** 2).sum()) for j in idx if j != i)
        scores[i] = sum(dists[:k])
    kept = sorted(idx, key=lambda i: (scores[i], i))[: min(keep, n)]
    accepted = [i in kept for i in range(len(rows))]
    grad = sum(rows[i] for i in kept) / len(kept) if kept else torch.zeros_like(rows[0])
    return {"accepted": accepted, "scores": scores, "grad": grad}


def reference_geometric_median(
    grads: Tensor, nu: float = 1e-3, max_iter: int = 100, tol: float = 1e-7
) -> dict:
    """dict(weights: list[float], grad: Tensor float64): Weiszfeld on the rows themselves."""
    rows = [r.double() for r in grads]
    idx = [i for i, r in enumerate(rows) if valid_vector(r)]
    weights = [0.0] * len(rows)
    if not idx:
        return {"weights": weights, "grad": torch.zeros_like(rows[0])}
    smoothing = nu * math.sqrt(sum(float(rows[i] @ rows[i]) for i in idx) / len(idx))
    for i in idx:
        weights[i] = 1.0 / len(idx)
    for _ in range(max_iter):
        z = sum(weights[i] * rows[i] for i in idx)
        alpha = {i: 1.0 / max(smoothing, float((z - rows[i]).norm())) for i in idx}
        total = sum(alpha.values())
        new = [alpha[i] / total if i in alpha else 0.0 for i in range(len(rows))]
        moved = max(abs(a - b) for a, b in zip(new, weights, strict=True))
        weights = new
        if moved <= tol:
            break
    grad = sum(weights[i] * rows[i] for i in idx)
    return {"weights": weights, "grad": grad}


def reference_coordinatewise(grads: Tensor, trim: int | None) -> Tensor:
    """Per coordinate over the valid rows: the median (``trim=None``), or the mean after
    dropping the ``trim`` largest and ``trim`` smallest values (at most (n - 1) // 2 each,
    n the number of valid rows)."""
    rows = [r.double() for r in grads if valid_vector(r)]
    if not rows:
        return torch.zeros(grads.shape[1], dtype=torch.float64)
    out = []
    for c in range(grads.shape[1]):
        values = sorted(float(r[c]) for r in rows)
        n = len(values)
        if trim is None:
            mid = n // 2
            out.append(values[mid] if n % 2 else (values[mid - 1] + values[mid]) / 2)
        else:
            b = min(trim, (n - 1) // 2)
            kept = values[b : n - b]
            out.append(sum(kept) / len(kept))
    return torch.tensor(out, dtype=torch.float64)
