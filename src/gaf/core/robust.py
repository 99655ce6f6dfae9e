"""Robust aggregation rules that need only the Gram matrix of the micro-gradients.

``rule="multi-krum"`` (options ``f``, ``m``) and ``rule="geometric-median"`` (options
``nu``, ``max_iter``, ``tol``) of :func:`gaf.filter_gradients`, the collectors,
:class:`gaf.GAFTrainer` and :mod:`gaf.distributed`, passed as ``rule_options=``; tau is
not used.

A faulty micro-gradient (a broken rank, a bad data shard, a stale or corrupted gradient)
spoils a plain average however many honest rows surround it. Two classical robust
aggregators decide from pairwise distances alone, and for rows g_1 … g_M with Gram matrix
G = X Xᵀ those are

    |g_i - g_j|² = G_ii + G_jj - 2 G_ij
    |Σ_j w_j g_j - g_i|² = wᵀ G w - 2 (G w)_i + G_ii

so, like the agreement rules of :mod:`gaf.core`, they run on the host over the small M × M
matrix, return weights w, and the direction is the one weighted sum Σ w_i g_i. In the
distributed protocol that keeps them at the traffic of one all-reduce, where the usual
implementations gather every rank's full gradient.

``multi_krum`` (Blanchard et al., NeurIPS 2017, "Machine learning with adversaries")::

    k = M - f - 2                               neighbours scored per row
    score_i = Σ of the k smallest |g_i - g_j|², j ≠ i
    keep the m rows with the smallest scores    (default m = M - f; Krum is m = 1)
    direction = mean of the kept rows

It tolerates f faulty rows when M > 2f + 2 (checked: a clear error otherwise).

``geometric_median`` (the smoothed Weiszfeld iteration of RFA, Pillutla et al. 2019,
"Robust aggregation for federated learning")::

    w = uniform over the rows
    repeat at most max_iter times:
        d_i = |Σ_j w_j g_j - g_i|               from G as above
        w_i ∝ 1 / max(ν, d_i)
        stop once no weight moved by more than tol
    direction = Σ w_i g_i

Deliberate choices:

* Invalid rows (non-finite or zero norm) are excluded first (weight 0, distance 2); Krum's
  neighbour count and the median's smoothing use the valid rows, f stays as given.
* ν is relative to the root-mean-square norm of the valid rows. Distances from a float32 G
  are exact only to about 3e-4 of the row norms (cancellation in G_ii + G_jj - 2 G_ij),
  hence the default ``nu = 1e-3``; a slightly negative squared distance is clamped to 0.
* Ties in Krum's scores go to the lowest index (stable sort): the same rows on every rank.
* The :class:`~gaf.core.Decision`: ``accepted`` the kept rows (Krum) or those of positive
  weight (median); ``distances[k]`` the cosine distance from the direction to row k;
  ``anchor`` Krum's best-scoring or the median's heaviest row. ``min_accepted = 1``: never
  skipped while one row is valid. Blind controls do not apply (no tau test to replace).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from gaf.core.decision import Decision
from gaf.core.distance import valid_rows


def _count(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    return int(value)


def _positive(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite positive number, got {value}")
    return value


def _no_unknown(name: str, unknown: dict, known: str) -> None:
    if unknown:
        raise ValueError(f"rule {name!r} takes no option {', '.join(map(repr, sorted(unknown)))}"
                         f"; its options are {known}")


def check_krum_options(f: object = 1, m: object = None, **unknown) -> dict:
    """Krum's options checked on their own (the row count is checked at decision time)."""
    _no_unknown("multi-krum", unknown, "f, m")
    f = _count(f, "multi-krum's f (faulty rows tolerated)", 0)
    m = None if m is None else _count(m, "multi-krum's m (rows kept)", 1)
    return {"f": f, "m": m}


def check_krum(rows: int, f: object = 1, m: object = None) -> tuple[int, int]:
    """Validate Krum's options for ``rows`` micro-gradients; returns (f, m)."""
    options = check_krum_options(f, m)
    f, m = options["f"], options["m"]
    if rows <= 2 * f + 2:
        raise ValueError(
            f"multi-krum with f = {f} needs more than 2f + 2 = {2 * f + 2} micro-gradients, "
            f"got M = {rows}: lower f or use more micro-batches / ranks"
        )
    m = rows - f if m is None else m
    if m > rows - f:
        raise ValueError(f"multi-krum keeps at most M - f = {rows - f} rows, got m = {m}")
    return f, m


def check_median_options(nu: object = 1e-3, max_iter: object = 100, tol: object = 1e-7,
                         **unknown) -> dict:
    """The geometric median's options, checked."""
    _no_unknown("geometric-median", unknown, "nu, max_iter, tol")
    return {"nu": _positive(nu, "geometric-median's nu (smoothing)"),
            "max_iter": _count(max_iter, "geometric-median's max_iter", 1),
            "tol": _positive(tol, "geometric-median's tol")}


def _host_gram(gram: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """G in float64 on the host with invalid rows/columns zeroed; (G, valid, finite)."""
    g = gram.detach().to("cpu", torch.float64).numpy() if isinstance(gram, Tensor) else gram
    g = np.asarray(g, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] == 0:
        raise ValueError(f"gram must be a non-empty square matrix, got shape {g.shape}")
    finite = np.isfinite(np.diag(g))
    valid = valid_rows(g)
    return np.where(valid[:, None] & valid[None, :], g, 0.0), valid, finite


def squared_distances(g: np.ndarray) -> np.ndarray:
    """|g_i - g_j|² = G_ii + G_jj - 2 G_ij, clamped at 0 against rounding."""
    diag = np.diag(g)
    return np.maximum(diag[:, None] + diag[None, :] - 2.0 * g, 0.0)


def _distances_to_direction(g: np.ndarray, w: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Cosine distance between Σ w_i g_i and each row; 2 for invalid rows."""
    dots = g @ w
    norm_sq = float(w @ dots)
    diag = np.diag(g)
    denom = np.sqrt(np.maximum(norm_sq * diag, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), 0.0)
    return np.where(valid, np.clip(1.0 - cos, 0.0, 2.0), 2.0)


def _empty(valid: np.ndarray, finite: np.ndarray) -> Decision:
    m = len(valid)
    return Decision(np.zeros(m, dtype=bool), np.zeros(m), np.full(m, 2.0), -1, valid, finite,
                    min_accepted=1)


def multi_krum(gram: Tensor | np.ndarray, f: int = 1, m: int | None = None) -> Decision:
    """Multi-Krum over the Gram matrix of M rows (see the module docstring)."""
    g, valid, finite = _host_gram(gram)
    f, keep = check_krum(g.shape[0], f, m)
    idx = np.flatnonzero(valid)
    if idx.size == 0:
        return _empty(valid, finite)
    sub = squared_distances(g[np.ix_(idx, idx)])
    n = idx.size
    k = min(max(1, n - f - 2), n - 1)
    scores = np.zeros(n)
    if n > 1:
        off = np.sort(sub + np.diag(np.full(n, np.inf)), axis=1)  # self at the end
        scores = off[:, :k].sum(axis=1)
    order = np.argsort(scores, kind="stable")[: min(keep, n)]
    accepted = np.zeros(len(valid), dtype=bool)
    accepted[idx[order]] = True
    weights = accepted / accepted.sum()
    distances = _distances_to_direction(g, weights, valid)
    return Decision(accepted, weights, distances, int(idx[order[0]]), valid, finite,
                    min_accepted=1)


def geometric_median(
    gram: Tensor | np.ndarray, nu: float = 1e-3, max_iter: int = 100, tol: float = 1e-7
) -> Decision:
    """Smoothed Weiszfeld geometric median over the Gram matrix (see the module docstring)."""
    g, valid, finite = _host_gram(gram)
    nu, max_iter, tol = check_median_options(nu, max_iter, tol).values()
    if not valid.any():
        return _empty(valid, finite)
    diag = np.diag(g)
    smoothing = nu * math.sqrt(float(diag[valid].mean()))
    w = valid / valid.sum()
    for _ in range(max_iter):
        gw = g @ w
        dist = np.sqrt(np.maximum(float(w @ gw) - 2.0 * gw + diag, 0.0))
        alpha = np.where(valid, 1.0 / np.maximum(smoothing, dist), 0.0)
        new = alpha / alpha.sum()
        settled = float(np.abs(new - w).max()) <= tol
        w = new
        if settled:
            break
    distances = _distances_to_direction(g, w, valid)
    return Decision(w > 0, w, distances, int(np.argmax(w)), valid, finite, min_accepted=1)


# -- as rules of the registry: rule(oracle, tau, valid, verdicts, **options) -------------


def _no_control(verdicts, name: str) -> None:
    if verdicts is not None:
        raise ValueError(f"rule {name!r} decides by distances alone: blind controls "
                         "(verdicts) apply to the agreement rules")


def multi_krum_rule(oracle, tau: float, valid: np.ndarray, verdicts, *, f: int = 1,
                    m: int | None = None) -> Decision:
    """:func:`multi_krum` over the oracle's Gram matrix; tau is not used."""
    _no_control(verdicts, "multi-krum")
    return multi_krum(oracle.gram, f=f, m=m)


def geometric_median_rule(oracle, tau: float, valid: np.ndarray, verdicts, *,
                          nu: float = 1e-3, max_iter: int = 100, tol: float = 1e-7
                          ) -> Decision:
    """:func:`geometric_median` over the oracle's Gram matrix; tau is not used."""
    _no_control(verdicts, "geometric-median")
    return geometric_median(oracle.gram, nu=nu, max_iter=max_iter, tol=tol)
