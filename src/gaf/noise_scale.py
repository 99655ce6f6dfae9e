"""The gradient noise scale B_simple = tr(Σ) / |G|², read from the Gram matrix GAF already has.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", arXiv 1812.06162): with
G the true gradient and Σ the covariance of one sample's gradient, B_simple = tr(Σ) / |G|² is
the batch size beyond which larger batches stop paying. GAF computes, every step, the Gram
matrix of M micro-gradients; that matrix alone estimates both quantities.

The estimator
-------------
Micro-gradient i is the mean of b_i per-sample gradients, g_i = G + (1/b_i) Σ_s ξ_s, with
the ξ_s independent, mean 0, covariance Σ, and the micro-batches disjoint. Then

    E[g_i · g_j] = |G|²                  (i ≠ j: the noises are independent, mean 0)
    E[|g_i|²]    = |G|² + tr(Σ) / b_i     (E|mean of b noises|² = tr(Σ) / b_i)

for any sizes b_i, equal or not. From one step's Gram matrix K (K_ij = g_i · g_j) over the
set V of valid rows, m = |V| ≥ 2:

    Ĝ² = 1 / (m (m - 1)) · Σ_{i ≠ j ∈ V} K_ij
    T̂  = 1 / m · Σ_{i ∈ V} b_i (K_ii - Ĝ²)

Both are unbiased. Ĝ² is a mean of terms each with expectation |G|² (the weights sum to one;
unequal sizes change the variance of each term, not its mean). For T̂, by linearity alone
(no independence between K_ii and Ĝ² is needed):

    E[b_i (K_ii - Ĝ²)] = b_i (|G|² + tr(Σ)/b_i - |G|²) = tr(Σ)        for every i,

so their mean is unbiased too. For M = 2 with equal b this is T̂ = (b/2)|g_1 - g_2|².

Smoothing
---------
A ratio of unbiased estimates is biased, and one step's Ĝ² is noisy (often negative when
b ≪ B). As McCandlish advise, the numerator and denominator are averaged separately and
divided afterwards (the ratio of averages, not the average of ratios): exponential
averages with decay ``beta`` over the valid steps, bias-corrected as in Adam,

    a_t = beta a_{t-1} + (1 - beta) x_t,   a_0 = 0,   x̄_t = a_t / (1 - beta^t),

exposed as :attr:`NoiseScale.grad_sq` and :attr:`NoiseScale.trace_cov`, and
:attr:`NoiseScale.b_simple` = trace_cov / grad_sq.

None before any valid step, ``inf`` when the averaged |G|² is ≤ 0 (see the properties);
invalid rows (non-finite, zero) are left out, and a step with fewer than two changes nothing.

The forecast
------------
In high dimension K_ij / (|g_i| |g_j|) concentrates near |G|² / (|G|² + tr(Σ)/b), so the
cosine distance between two micro-gradients of b samples is about

    D(b) = B / (B + b)                                      (:meth:`expected_distance`)

and the paper's rule at tau accepts roughly when D(b) ≤ tau, i.e.

    b ≥ B (1 - tau) / tau                                   (:meth:`micro_batch_for`)

(about B/32 at tau = 0.97).

Finite data: for micro-batches drawn without replacement from N samples with per-sample
gradients g_s (S1 = Σ g_s, S2 = Σ |g_s|², ḡ = S1/N), the same algebra gives
E[Ĝ²] = |ḡ|² - T/N and E[T̂] = T with T = (S2 - N|ḡ|²)/(N - 1): exactly the
finite-sample-corrected |G|² and tr(Σ) of those N samples, for any sizes. The estimate
reads only the Gram matrix, so it is the same on every rank that holds the same K.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Rounding in a float32 Gram leaves K_ij and K_ji apart by about sqrt(P) eps |g_i||g_j|;
# a matrix further apart than this is not a Gram matrix.
SYMMETRY_RTOL = 1e-3


@dataclass(frozen=True)
class NoiseEstimate:
    """One step's unbiased estimates: ``grad_sq`` of |G|², ``trace_cov`` of tr(Σ), over
    ``num_valid`` rows."""

    grad_sq: float
    trace_cov: float
    num_valid: int


def _real(name: str, value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    return float(value)


def check_beta(beta: object) -> float:
    beta = _real("beta", beta, "a real number in [0, 1)")
    if not 0.0 <= beta < 1.0:
        raise ValueError(
            f"beta must lie in [0, 1) (the decay of the exponential average; 0.99 keeps about "
            f"the last 100 steps), got {beta}"
        )
    return beta


def as_gram(gram: object) -> np.ndarray:
    """``gram`` as a float64 host array, checked to be square (and non-empty)."""
    if isinstance(gram, torch.Tensor):
        g = gram.detach().to("cpu", torch.float64).numpy()
    elif isinstance(gram, np.ndarray):
        g = gram.astype(np.float64, copy=False)
    else:
        raise TypeError(f"gram must be a torch.Tensor or numpy array, got {type(gram).__name__}")
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] == 0:
        raise ValueError(
            f"gram must be a square [M, M] matrix of micro-gradient products, got shape "
            f"{tuple(g.shape)}"
        )
    return g


def as_sizes(sizes: object, m: int) -> np.ndarray:
    """``sizes`` (an int, or one per row) as a float64 array of length ``m``, all ≥ 1."""
    if isinstance(sizes, torch.Tensor):
        sizes = sizes.detach().cpu().numpy()
    arr = np.asarray(sizes) if isinstance(sizes, (int, np.integer, Sequence, np.ndarray)) \
        and not isinstance(sizes, (str, bool, np.bool_)) else None
    if arr is None or arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"sizes must be integers, one or one per row (samples per micro-batch), "
                        f"got {sizes!r}")
    arr = np.full(m, float(arr)) if arr.ndim == 0 else arr.astype(np.float64).reshape(-1)
    if arr.shape != (m,):
        raise ValueError(f"sizes must be one int or one per row of the Gram matrix ({m}), "
                         f"got {arr.shape[0]} sizes")
    if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
        raise ValueError(f"sizes must be whole numbers of samples, got {sizes!r}")
    if np.any(arr <= 0):
        raise ValueError(f"sizes must be positive (samples per micro-batch), got {sizes!r}")
    return arr


def kept_rows(g: np.ndarray) -> np.ndarray:
    """Rows that take part: finite, non-zero squared norm, and finite products with the
    other such rows (a true Gram matrix of finite rows has them; a corrupted one may not)."""
    diag = np.diag(g)
    keep = np.isfinite(diag) & (diag > 0)
    block_ok = np.isfinite(g) | ~(keep[:, None] & keep[None, :])
    return keep & block_ok.all(axis=1)


def check_symmetric(g: np.ndarray, keep: np.ndarray) -> None:
    sub = g[np.ix_(keep, keep)]
    scale = np.sqrt(np.outer(np.diag(sub), np.diag(sub)))
    gap = np.abs(sub - sub.T)
    if np.any(gap > SYMMETRY_RTOL * scale):
        i, j = np.unravel_index(np.argmax(gap / scale), gap.shape)
        raise ValueError(
            f"gram is not symmetric: entries ({i}, {j}) and ({j}, {i}) of the valid rows "
            f"differ by {gap[i, j]:.3g}; pass the Gram matrix X @ X.T of the micro-gradients"
        )


def step_estimate(gram: object, sizes: object) -> NoiseEstimate | None:
    """One step's unbiased (|G|², tr(Σ)) estimates, or None if fewer than two rows are valid.

    Checks the input (shape, sizes, symmetry) and raises on bad input.
    """
    g = as_gram(gram)
    b = as_sizes(sizes, g.shape[0])
    keep = kept_rows(g)
    check_symmetric(g, keep)
    m = int(keep.sum())
    if m < 2:
        return None
    sub, bk = g[np.ix_(keep, keep)], b[keep]
    diag = np.diag(sub)
    grad_sq = (sub.sum() - diag.sum()) / (m * (m - 1))
    trace_cov = float(np.mean(bk * (diag - grad_sq)))
    return NoiseEstimate(float(grad_sq), trace_cov, m)


class NoiseScale:
    """Running estimate of the gradient noise scale B_simple = tr(Σ) / |G|² from each step's
    Gram matrix of micro-gradients (see the module docstring for the estimator and its
    proof of unbiasedness).

    Args:
        beta: decay of the exponential averages of |G|² and tr(Σ), in [0, 1); 0 keeps only
            the last step. The default 0.995 remembers about 1 / (1 - beta) = 200 valid
            steps (an effective sample of about 400 once warm): a step with two
            micro-batches of b ≪ B samples measures |G|² with a spread near its size, so
            fewer steps would leave B_simple ±10% noisy.

    Example::

        noise = gaf.NoiseScale()
        noise.update(gaf.gram_matrix(stack), sizes=32)   # stack: [M, P] micro-gradients
        noise.b_simple, noise.expected_distance(32), noise.micro_batch_for(0.97)
    """

    def __init__(self, beta: float = 0.995):
        self.beta = check_beta(beta)
        self.reset()

    def reset(self) -> None:
        """Forget every step."""
        self.num_steps = 0  # valid steps averaged so far
        self._grad_sq_avg = 0.0
        self._trace_cov_avg = 0.0
        self.last: NoiseEstimate | None = None  # the latest valid step's own estimates

    def update(self, gram: object, sizes: object) -> NoiseEstimate | None:
        """Add one step: ``gram`` the [M, M] Gram matrix (tensor or array), ``sizes`` the
        samples per micro-batch (an int, or one per row). Returns that step's estimates, or
        None when fewer than two rows were valid (then nothing changes)."""
        est = step_estimate(gram, sizes)
        if est is None:
            return None
        b = self.beta
        self._grad_sq_avg = b * self._grad_sq_avg + (1.0 - b) * est.grad_sq
        self._trace_cov_avg = b * self._trace_cov_avg + (1.0 - b) * est.trace_cov
        self.num_steps += 1
        self.last = est
        return est

    def _corrected(self, avg: float) -> float | None:
        if self.num_steps == 0:
            return None
        return avg / (1.0 - self.beta**self.num_steps)

    @property
    def grad_sq(self) -> float | None:
        """Smoothed estimate of |G|² (None before the first valid step; may be ≤ 0 when the
        noise swamps the signal)."""
        return self._corrected(self._grad_sq_avg)

    @property
    def trace_cov(self) -> float | None:
        """Smoothed estimate of tr(Σ), the per-sample gradient variance (None before the
        first valid step)."""
        return self._corrected(self._trace_cov_avg)

    @property
    def b_simple(self) -> float | None:
        """trace_cov / grad_sq: None before the first valid step, ``inf`` when grad_sq ≤ 0,
        0.0 when trace_cov ≤ 0 < grad_sq."""
        if self.num_steps == 0:
            return None
        if self._grad_sq_avg <= 0.0:
            return math.inf
        if self._trace_cov_avg <= 0.0:
            return 0.0
        # The bias corrections of numerator and denominator cancel.
        return self._trace_cov_avg / self._grad_sq_avg

    def expected_distance(self, b: float, b_other: float | None = None) -> float | None:
        """Forecast cosine distance between two micro-gradients of ``b`` (and ``b_other``,
        default ``b``) samples: 1 - 1/sqrt((1 + B/b)(1 + B/b_other)), which is B / (B + b)
        for equal sizes. None before the first valid step."""
        b = _positive("b", b)
        b2 = b if b_other is None else _positive("b_other", b_other)
        big_b = self.b_simple
        if big_b is None:
            return None
        if math.isinf(big_b):
            return 1.0
        if b_other is None:
            return big_b / (big_b + b)
        return 1.0 - 1.0 / math.sqrt((1.0 + big_b / b) * (1.0 + big_b / b2))

    def micro_batch_for(self, tau: float) -> float | None:
        """The micro-batch size at which the forecast distance meets ``tau``:
        B (1 - tau) / tau (not rounded). 0.0 for tau ≥ 1 (the forecast is below 1 at every
        size), ``inf`` while B is infinite; None before the first valid step."""
        tau = _real("tau", tau, "a real number in (0, 2]")
        if not 0.0 < tau <= 2.0:
            raise ValueError(
                f"tau must lie in (0, 2] (a cosine distance; at tau = 0 no size suffices), "
                f"got {tau}"
            )
        big_b = self.b_simple
        if big_b is None:
            return None
        if tau >= 1.0:
            return 0.0
        return big_b * (1.0 - tau) / tau

    def state_dict(self) -> dict:
        return {
            "beta": self.beta,
            "num_steps": self.num_steps,
            "grad_sq_avg": self._grad_sq_avg,
            "trace_cov_avg": self._trace_cov_avg,
        }

    def load_state_dict(self, state: dict) -> None:
        expected = {"beta", "num_steps", "grad_sq_avg", "trace_cov_avg"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"NoiseScale state must have keys {sorted(expected)}, got {got}")
        steps = state["num_steps"]
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
            raise ValueError(f"num_steps must be a non-negative int, got {steps!r}")
        avgs = [float(state["grad_sq_avg"]), float(state["trace_cov_avg"])]
        if not all(math.isfinite(a) for a in avgs):
            raise ValueError(f"NoiseScale state holds non-finite averages: {avgs}")
        self.beta = check_beta(state["beta"])
        self.num_steps = int(steps)
        self._grad_sq_avg, self._trace_cov_avg = avgs
        self.last = None

    def __repr__(self) -> str:
        return f"NoiseScale(beta={self.beta}, num_steps={self.num_steps}, b_simple={self.b_simple})"


def _positive(name: str, value: object) -> float:
    v = _real(name, value, "a positive number of samples")
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive number of samples, got {value!r}")
    return v
