"""Slow float64 reference for :class:`gaf.NoiseScale`: plain loops over each Gram matrix,
written from the estimator's definition (:mod:`gaf.noise_scale`), for the tests."""

from __future__ import annotations

import math


def reference_step(gram: list[list[float]], sizes: list[float]) -> tuple[float, float] | None:
    """(|G|² estimate, tr(Σ) estimate) of one step, or None with fewer than two valid rows
    (finite positive squared norm, finite products with the other such rows)."""
    m = len(gram)
    candidates = [i for i in range(m) if math.isfinite(gram[i][i]) and gram[i][i] > 0]
    rows = [i for i in candidates if all(math.isfinite(gram[i][j]) for j in candidates)]
    if len(rows) < 2:
        return None
    off_sum, pairs = 0.0, 0
    for i in rows:
        for j in rows:
            if i != j:
                off_sum += float(gram[i][j])
                pairs += 1
    grad_sq = off_sum / pairs
    trace_cov = sum(float(sizes[i]) * (float(gram[i][i]) - grad_sq) for i in rows) / len(rows)
    return grad_sq, trace_cov


def reference_noise_scale(steps, beta: float = 0.99) -> dict:
    """Run the estimator over ``steps``, a sequence of (gram as nested lists, sizes list).

    Returns dict(grad_sq, trace_cov, b_simple, num_steps): bias-corrected exponential
    averages over the valid steps and their ratio (None before any valid step, inf when
    the averaged |G|² is ≤ 0, 0 when the averaged tr(Σ) is ≤ 0).
    """
    avg_g, avg_t, n = 0.0, 0.0, 0
    for gram, sizes in steps:
        est = reference_step(gram, sizes)
        if est is None:
            continue
        avg_g = beta * avg_g + (1 - beta) * est[0]
        avg_t = beta * avg_t + (1 - beta) * est[1]
        n += 1
    if n == 0:
        return {"grad_sq": None, "trace_cov": None, "b_simple": None, "num_steps": 0}
    corr = 1 - beta**n
    g, t = avg_g / corr, avg_t / corr
    b = math.inf if g <= 0 else (0.0 if t <= 0 else t / g)
    return {"grad_sq": g, "trace_cov": t, "b_simple": b, "num_steps": n}
