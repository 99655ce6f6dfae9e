"""The agreement rules, each a pure function of a distance oracle (for cosine: of G).

Signature of every rule (what :mod:`gaf.core.registry` lists)::

    rule(oracle, tau, valid, verdicts, **options) -> Decision

``valid`` [M] marks the rows that take part (at least one is valid: the registry handles
the all-invalid case); ``verdicts`` is None, or a blind control's bool per row that
replaces the test ``distance <= tau`` (:func:`agrees`). See docs/design.md, "The rules".

The sequential rules ("mean", "halving") are one fold over the products
(s·g_k, |s|², |g_k|²), :func:`fold_row`. Three paths call it: the Gram replay here (the
products from G and the weights so far, exact), the streaming collector on the host
(Python floats) and on an accelerator (0-d tensors, so that no step synchronises).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from gaf.core.decision import Decision, DistanceOracle
from gaf.core.distance import distance_from_products


def agrees(distance: float, tau: float, verdicts: np.ndarray | None, k: int) -> bool:
    """The one test every rule makes of a row: its distance within tau, or, under a blind
    control, the control's verdict for that row."""
    return bool(verdicts[k]) if verdicts is not None else distance <= tau


# -- the sequential fold -----------------------------------------------------------------


def _where(cond, if_true, if_false):
    if isinstance(cond, Tensor):
        import torch  # the device arm only

        return torch.where(cond, if_true, if_false)
    return if_true if cond else if_false


def _not(flag):
    return ~flag if isinstance(flag, Tensor) else not flag


@dataclass(frozen=True)
class FoldStep:
    """One row of a sequential rule: whether it was accepted, its reported distance,
    whether it became the anchor (s ← g), and the state after it."""

    accept: object  # bool or 0-d bool tensor
    distance: object  # float or 0-d tensor
    anchor: object  # bool or 0-d bool tensor
    norm_sq: object  # |s|² after the row
    have_anchor: object


def fold_coefficients(halving: bool, anchor: bool) -> tuple[float, float]:
    """(a, b) of the update s ← a·s + b·g for an accepted row."""
    if anchor:
        return 0.0, 1.0
    return (0.5, 0.5) if halving else (1.0, 1.0)


def fold_weights(halving: bool, accepted: np.ndarray) -> np.ndarray:
    """The weights w of s = Σ w_i g_i after the fold accepted ``accepted`` (in order):
    the first accepted row is the anchor. "mean" divides by the count at the end."""
    weights = np.zeros(len(accepted))
    for k in np.flatnonzero(accepted):
        a, b = fold_coefficients(halving, not weights.any())
        weights *= a
        weights[k] += b
    if not halving and accepted.any():
        weights /= weights.sum()
    return weights


def fold_row(halving: bool, norm_sq_s, have_anchor, dot, norm_sq_g, valid, tau: float,
             verdict: bool | None = None, distance=None) -> FoldStep:
    """The sequential rules, one row at a time, from (s·g, |s|², |g|²).

    The first valid row becomes the anchor (s ← g, distance 0). A later valid row is
    accepted when D(s, g) <= tau (or when the control's ``verdict`` says so); then
    s ← s + g ("mean") or s ← (s + g) / 2 ("halving", ``halving=True``), and
    |s|² ← |s|² + 2 s·g + |g|² (a quarter of it for "halving": exact scaling by a power of
    two). Invalid rows are never accepted and report 2. ``distance`` overrides the cosine
    of the products (other measures, the "anchor" rule). Floats or 0-d tensors alike.
    """
    if distance is None:
        distance = distance_from_products(dot, norm_sq_s, norm_sq_g)
    is_anchor = valid & _not(have_anchor)
    passes = verdict if verdict is not None else distance <= tau
    accept = valid & (is_anchor | passes)
    grown = norm_sq_s + 2 * dot + norm_sq_g
    if halving:
        grown = grown / 4
    norm_sq = _where(accept, _where(is_anchor, norm_sq_g, grown), norm_sq_s)
    reported = _where(is_anchor, 0.0, _where(valid, distance, 2.0))
    return FoldStep(accept, reported, is_anchor, norm_sq, have_anchor | valid)


def sequential(oracle: DistanceOracle, tau: float, valid: np.ndarray,
               verdicts: np.ndarray | None, halving: bool = False,
               compare_with_anchor: bool = False) -> Decision:
    """Replay the fold over G: the weights w of s = Σ w_i g_i give its products exactly.

    ``compare_with_anchor``: the "anchor" rule, each row against g_anchor alone (the
    running sum still accumulates as "mean").
    """
    m = len(valid)
    weights = np.zeros(m)
    accepted = np.zeros(m, dtype=bool)
    distances = np.full(m, 2.0)
    have_anchor, anchor, one_hot = False, -1, None
    for k in range(m):
        dot = norm_sq_s = norm_sq_g = 0.0
        distance = 2.0  # the anchor and invalid rows are reported by the fold itself
        if valid[k] and have_anchor:
            products = None if compare_with_anchor else oracle.products(weights, k)
            if products is None:
                distance = oracle.to_sum(one_hot if compare_with_anchor else weights, k)
            else:
                (dot, norm_sq_s, norm_sq_g), distance = products, None
        step = fold_row(halving, norm_sq_s, have_anchor, dot, norm_sq_g, bool(valid[k]), tau,
                        None if verdicts is None else bool(verdicts[k]), distance)
        distances[k] = step.distance
        if step.accept:
            accepted[k] = True
            a, b = fold_coefficients(halving, step.anchor)
            weights *= a
            weights[k] += b
            if step.anchor:
                anchor, one_hot = k, np.eye(m)[k]
        have_anchor = step.have_anchor
    if not halving:
        weights /= weights.sum()
    return Decision(accepted, weights, distances, anchor, valid)


def mean_rule(oracle, tau, valid, verdicts) -> Decision:
    return sequential(oracle, tau, valid, verdicts)


def halving_rule(oracle, tau, valid, verdicts) -> Decision:
    return sequential(oracle, tau, valid, verdicts, halving=True)


def anchor_rule(oracle, tau, valid, verdicts) -> Decision:
    return sequential(oracle, tau, valid, verdicts, compare_with_anchor=True)


# -- the rules over all rows at once --------------------------------------------------------


def neighbours_rule(oracle: DistanceOracle, tau: float, valid: np.ndarray,
                    verdicts: np.ndarray | None) -> Decision:
    """The row with the most neighbours within tau is the anchor; it and they are kept."""
    dist = oracle.pairwise()
    if verdicts is None:
        close = (dist <= tau) & valid[:, None] & valid[None, :]
        np.fill_diagonal(close, False)
        counts = np.where(valid, close.sum(axis=1), -1)
        anchor = int(np.argmax(counts))  # argmax returns the lowest index among ties
        accepted = close[anchor].copy()
    else:  # blind: the anchor cannot be chosen by its neighbours
        anchor = int(np.argmax(valid))
        accepted = valid & verdicts
    accepted[anchor] = True
    distances = np.where(valid, dist[anchor], 2.0)
    distances[anchor] = 0.0
    weights = (accepted / accepted.sum()).astype(np.float64)
    return Decision(accepted, weights, distances, anchor, valid)


def consensus_rule(oracle: DistanceOracle, tau: float, valid: np.ndarray,
                   verdicts: np.ndarray | None) -> Decision:
    """Each valid row against the sum of all the other valid rows (leave-one-out).

    From G: (S - g_k)·g_k = (G1)_k - G_kk and |S - g_k|² = 1ᵀG1 - 2 (G1)_k + G_kk; the
    oracle's ``to_sum`` with weights 1_valid - e_k is exactly that (and serves every
    measure). No anchor (-1).
    """
    m = len(valid)
    others = valid.astype(np.float64)
    accepted = np.zeros(m, dtype=bool)
    distances = np.full(m, 2.0)
    for k in np.flatnonzero(valid):
        others[k] = 0.0  # weights of S - g_k
        d = oracle.to_sum(others, k)
        others[k] = 1.0
        distances[k] = d
        accepted[k] = agrees(d, tau, verdicts, k)
    count = int(accepted.sum())
    weights = accepted / count if count else np.zeros(m)
    return Decision(accepted, weights.astype(np.float64), distances, -1, valid)
