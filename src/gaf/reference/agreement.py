"""Float64 references of the agreement rules, straight from their definitions (see
:mod:`gaf.reference`)."""

from __future__ import annotations

import torch
from torch import Tensor

from gaf.core import valid_vector


def reference_distance(a: Tensor, b: Tensor) -> float:
    """1 - cos(a, b) in float64, clamped to [0, 2]; 2 if either vector is zero (a zero
    vector has no direction, so it agrees with nothing: the convention of :mod:`gaf.core`)."""
    a, b = a.double(), b.double()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 2.0
    return float(torch.clamp(1 - (a @ b) / (na * nb), 0.0, 2.0))


def reference_filter(grads: Tensor, tau: float, rule: str = "mean") -> dict:
    """Return dict(accepted: list[bool], distances: list[float], grad: Tensor float64)."""
    m = grads.shape[0]
    rows = [grads[i].double() for i in range(m)]
    valid = [valid_vector(r) for r in rows]
    accepted = [False] * m
    distances = [2.0] * m
    if not any(valid):
        return {"accepted": accepted, "distances": distances, "grad": torch.zeros_like(rows[0])}

    if rule == "neighbours":
        def neighbours(i: int) -> list[int]:
            return [
                j for j in range(m)
                if j != i and valid[j] and reference_distance(rows[i], rows[j]) <= tau
            ]

        counts = [len(neighbours(i)) if valid[i] else -1 for i in range(m)]
        anchor = counts.index(max(counts))
        members = [anchor, *neighbours(anchor)]
        for k in range(m):
            if valid[k]:
                distances[k] = reference_distance(rows[anchor], rows[k])
            accepted[k] = k in members
        distances[anchor] = 0.0
        grad = sum(rows[k] for k in members) / len(members)
        return {"accepted": accepted, "distances": distances, "grad": grad}

    if rule == "consensus":
        # Every valid row against the sum of all the other valid rows.
        for k in range(m):
            if valid[k]:
                others = sum((rows[j] for j in range(m) if j != k and valid[j]),
                             torch.zeros_like(rows[k]))
                distances[k] = reference_distance(others, rows[k])
                accepted[k] = distances[k] <= tau
        members = [k for k in range(m) if accepted[k]]
        grad = (sum(rows[k] for k in members) / len(members) if members
                else torch.zeros_like(rows[0]))
        return {"accepted": accepted, "distances": distances, "grad": grad}

    anchor = valid.index(True)
    accepted[anchor] = True
    distances[anchor] = 0.0
    s = rows[anchor].clone()
    for k in range(anchor + 1, m):
        if not valid[k]:
            continue
        other = rows[anchor] if rule == "anchor" else s
        distances[k] = reference_distance(other, rows[k])
        if distances[k] <= tau:
            accepted[k] = True
            s = (s + rows[k]) / 2 if rule == "halving" else s + rows[k]
    if rule == "halving":
        grad = s
    else:
        grad = sum(rows[k] for k in range(m) if accepted[k]) / sum(accepted)
    return {"accepted": accepted, "distances": distances, "grad": grad}
