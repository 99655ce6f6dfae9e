"""Distances from products, and the checks every decision makes of its inputs.

One convention for zero vectors across the library (:func:`distance_from_products`,
:func:`pairwise_distances`, :func:`gaf.core.cosine_distance`, :mod:`gaf.reference`): a
zero vector has no direction, so it agrees with nothing and its distance to anything is
``ZERO_DISTANCE`` = 2, the maximum. A running sum can become zero (g and -g accepted at
tau = 2); the next row is then accepted only at tau = 2.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

ZERO_DISTANCE = 2.0

# Squared norms at or below this count as zero: the row has no direction to agree with.
ZERO_NORM_SQ = 0.0


def check_tau(tau: object) -> float:
    """Return tau as a float, or raise if it is not a finite number in [0, 2]."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float, np.floating, np.integer)):
        if isinstance(tau, Tensor) and tau.numel() == 1 and tau.is_floating_point():
            tau = float(tau)
        else:
            raise TypeError(f"tau must be a real number, got {type(tau).__name__}")
    tau = float(tau)
    if not math.isfinite(tau):
        raise ValueError(f"tau must be finite, got {tau}")
    if not 0.0 <= tau <= 2.0:
        raise ValueError(f"tau must lie in [0, 2] (cosine distance range), got {tau}")
    return tau


def distance_from_products(dot, norm_sq_s, norm_sq_g):
    """Cosine distance from s·g, |s|², |g|², clamped to [0, 2]; 2 if either norm is zero.

    Works on Python floats (the host paths branch freely) and on 0-d tensors (the
    streaming device path, which must not synchronise): the same arithmetic either way.
    """
    denom = norm_sq_s * norm_sq_g
    if isinstance(denom, Tensor):
        positive = denom > 0
        safe = torch.where(positive, denom, torch.ones_like(denom))
        cos = torch.where(positive, dot / torch.sqrt(safe),
                          torch.full_like(denom, 1.0 - ZERO_DISTANCE))
        return torch.clamp(1.0 - cos, 0.0, 2.0)
    if denom <= 0.0:
        return ZERO_DISTANCE
    return min(2.0, max(0.0, 1.0 - dot / math.sqrt(denom)))


def valid_norm_sq(norm_sq):
    """Whether a row with squared norm ``norm_sq`` can take part: finite and non-zero.

    The library's one definition of a valid micro-gradient (a finite |g|² implies finite
    entries); on a float, a numpy array or a tensor (elementwise, no host sync)."""
    if isinstance(norm_sq, Tensor):
        return torch.isfinite(norm_sq) & (norm_sq > ZERO_NORM_SQ)
    if isinstance(norm_sq, np.ndarray):
        return np.isfinite(norm_sq) & (norm_sq > ZERO_NORM_SQ)
    return math.isfinite(norm_sq) and norm_sq > ZERO_NORM_SQ


def valid_vector(v: Tensor) -> bool:
    """:func:`valid_norm_sq` of one vector, |v|² taken in float64 (where the squares of a
    float32 vector can neither overflow nor underflow to zero)."""
    v = v.detach().double().reshape(-1)
    return bool(valid_norm_sq(float(v @ v)))


def valid_rows(gram: np.ndarray) -> np.ndarray:
    """Rows of a Gram matrix that can take part (:func:`valid_norm_sq` of the diagonal).

    |G[i, j]| <= |g_i| |g_j| keeps the entries between two valid rows finite; only the
    diagonal needs checking.
    """
    return valid_norm_sq(np.diag(gram))


def pairwise_distances(g: np.ndarray) -> np.ndarray:
    """Cosine distance matrix from a Gram matrix, clamped to [0, 2] (zero norms give 2)."""
    diag = np.diag(g)
    denom = np.sqrt(np.outer(diag, diag))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(denom > 0, g / np.where(denom > 0, denom, 1.0), 1.0 - ZERO_DISTANCE)
    return np.clip(1.0 - cos, 0.0, 2.0)
