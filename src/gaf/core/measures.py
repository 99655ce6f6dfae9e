"""Agreement measures beside cosine distance, and the rules generalised to a distance oracle.

Every rule asks "how far is s = Σ w_i g_i from g_k?" or "how far apart are g_i and
g_j?"; a :class:`DistanceOracle` answers both for one measure and
:func:`gaf.core.decide_with` runs the rules on it. All distances lie in [0, 2] with the
cosine reading: 0 full agreement, 1 no relation, 2 opposed.

``"cosine"``     D(a, b) = 1 - a·b / (|a| |b|), from the Gram matrix.

``"sign"``       D_sign(a, b) = 1 - Σ_i sign(a_i) sign(b_i) / sqrt(nnz(a) · nnz(b)): with
                 no zeros, 2 × the fraction of differing signs (tau = 0.97 demands 51.5%
                 matching). Exact zeros count as neither; magnitudes are ignored, so a few
                 huge coordinates cannot dominate. Sequential rules compare sign(s).

``"layerwise"``  Cosine distance judged per parameter tensor l and combined by the
                 unweighted mean over the tensors where both vectors are non-zero:
                 D_layer(a, b) = mean_l D(a_l, b_l) (1 if no tensor qualifies). Each
                 tensor gets one vote, so a small tensor (the classifier, a bias) counts
                 as much as the largest convolution; under whole-vector cosine the largest
                 tensors decide alone. Needs the tensor sizes (``segments``).

Cost: cosine and layerwise cost one Gram matrix worth of flops, O(M²P) (layerwise keeps
L of them, [L, M, M]); sign with "anchor"/"neighbours" one more Gram, of sign(X); sign
with "mean"/"halving" revisits the data after every decision (sign(s) of a sum is no
function of a Gram matrix): M-1 comparisons, each with a device→host sync, and
distributed a tiny all-reduce each (docs/distributed.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from gaf.core.decision import Decision, DistanceOracle, GramOracle
from gaf.core.distance import (
    distance_from_products,
    pairwise_distances,
    valid_norm_sq,
    valid_rows,
    valid_vector,
)
from gaf.core.registry import decide_with
from gaf.core.tensors import check_grads, gram_matrix, weighted_sum

MEASURES: tuple[str, ...] = ("cosine", "sign", "layerwise")


def check_measure(measure: object) -> str:
    """Return measure if it names a known measure, else raise ValueError listing them."""
    if not isinstance(measure, str) or measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; choose one of {', '.join(MEASURES)}")
    return measure


def check_segments(segments: object, numel: int) -> list[int]:
    """Validate tensor sizes that split a flat row of ``numel`` numbers."""
    if segments is None:
        raise ValueError(
            "the layerwise measure needs segments= (the parameter sizes of a flat row); "
            "GradientCollector and GAFTrainer pass them for you"
        )
    try:
        sizes = [int(s) for s in segments]  # type: ignore[union-attr]
    except TypeError as exc:
        raise ValueError(f"segments must be a sequence of positive ints, got {segments!r}") from exc
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"segments must be non-empty positive sizes, got {sizes}")
    if sum(sizes) != numel:
        raise ValueError(f"segments sum to {sum(sizes)} but a row has {numel} numbers")
    return sizes


# --------------------------------------------------------------------------------------
# Distances between two flat tensors (reference definitions)


def sign_distance(a: Tensor, b: Tensor) -> float:
    """D_sign(a, b) = 1 - Σ sign(a)sign(b) / sqrt(nnz(a) nnz(b)), in [0, 2].

    2 (agrees with nothing) if either vector is not finite or is all zeros.
    """
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"expected two flat tensors of equal length, got {a.shape}, {b.shape}")
    if not (valid_vector(a) and valid_vector(b)):
        return 2.0
    sa, sb = torch.sign(a).to(torch.float64), torch.sign(b).to(torch.float64)
    na, nb = float(sa.abs().sum()), float(sb.abs().sum())
    return distance_from_products(float(sa @ sb), na, nb)


def layerwise_distance(a: Tensor, b: Tensor, segments: Sequence[int]) -> float:
    """Mean over tensors (where both are non-zero) of the per-tensor cosine distance."""
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"expected two flat tensors of equal length, got {a.shape}, {b.shape}")
    sizes = check_segments(segments, a.numel())
    if not (valid_vector(a) and valid_vector(b)):
        return 2.0
    ds = []
    for pa, pb in zip(a.double().split(sizes), b.double().split(sizes), strict=True):
        na, nb = float(pa @ pa), float(pb @ pb)
        if na > 0 and nb > 0:
            ds.append(distance_from_products(float(pa @ pb), na, nb))
    return float(np.mean(ds)) if ds else 1.0


# --------------------------------------------------------------------------------------
# Distance oracles


def layer_gram_matrices(grads: Tensor, segments: Sequence[int]) -> Tensor:
    """Per-tensor Gram matrices [L, M, M] of a stack [M, P] split by ``segments``.

    Same accumulation dtype as :func:`gaf.core.gram_matrix`; their sum over L is the whole
    Gram matrix. Distributed, each rank computes these over its shard and one all-reduce of
    L·M² numbers sums them.
    """
    grads = check_grads(grads)
    sizes = check_segments(segments, grads.shape[1])
    return torch.stack([gram_matrix(part) for part in grads.split(sizes, dim=1)])


class LayerwiseOracle(DistanceOracle):
    """Layer-wise cosine from per-tensor Gram matrices [L, M, M] (see module docstring)."""

    def __init__(self, layer_grams: Tensor | np.ndarray):
        lg = layer_grams
        if isinstance(lg, Tensor):
            lg = lg.detach().to("cpu", torch.float64).numpy()
        lg = np.asarray(lg, dtype=np.float64)
        if lg.ndim != 3 or lg.shape[1] != lg.shape[2] or 0 in lg.shape:
            raise ValueError(f"layer_grams must have shape [L, M, M], got {lg.shape}")
        total = lg.sum(axis=0)
        self.finite = np.isfinite(np.diag(total))
        self.valid = valid_rows(total)
        mask = self.valid[:, None] & self.valid[None, :]
        self.lg = np.where(mask[None], lg, 0.0)
        # A valid row has every per-tensor entry finite (|G_l[i,j]| <= |g_i| |g_j|).

    def _combine(self, dots: np.ndarray, ns: np.ndarray, ng: np.ndarray) -> float:
        ds = [distance_from_products(float(d), float(a), float(b))
              for d, a, b in zip(dots, ns, ng, strict=True) if a > 0 and b > 0]
        return float(np.mean(ds)) if ds else 1.0

    def to_sum(self, weights: np.ndarray, k: int) -> float:
        lg = self.lg
        dots = lg[:, :, k] @ weights  # [L]: s_l · g_{k,l}
        ns = np.einsum("i,lij,j->l", weights, lg, weights)  # |s_l|²
        return self._combine(dots, ns, lg[:, k, k])

    def pairwise(self) -> np.ndarray:
        m = self.lg.shape[1]
        out = np.ones((m, m))
        for i in range(m):
            for j in range(m):
                out[i, j] = 0.0 if i == j else self._combine(
                    self.lg[:, i, j], self.lg[:, i, i], self.lg[:, j, j])
        return out


class SignOracle(DistanceOracle):
    """Sign distance over the rows themselves (not Gram-based for the sequential rules)."""

    def __init__(self, grads: Tensor):
        self.rows = check_grads(grads)
        norm_sq = gram_matrix(self.rows).diagonal().to("cpu", torch.float64).numpy()
        self.finite = np.isfinite(norm_sq)
        self.valid = valid_norm_sq(norm_sq)
        # Signs as float32 so the dot products below are exact integers (|sum| <= 2^24 rows
        # would be needed for float32 to round; float64 for larger P).
        dtype = torch.float32 if self.rows.shape[1] < 2**24 else torch.float64
        signs = torch.sign(torch.nan_to_num(self.rows, nan=0.0, posinf=0.0, neginf=0.0))
        self.signs = signs.to(dtype)
        self.nnz = self.signs.abs().sum(dim=1).to("cpu", torch.float64).numpy()

    def to_sum(self, weights: np.ndarray, k: int) -> float:
        # Only rows with non-zero weight are touched (an invalid row may hold inf/NaN).
        s = torch.zeros(self.rows.shape[1], dtype=self.rows.dtype, device=self.rows.device)
        weighted_sum(self.rows, weights, s)
        ss = torch.sign(s).to(self.signs.dtype)
        dot, nnz_s = torch.stack([ss @ self.signs[k], ss.abs().sum()]).cpu().double().tolist()
        return distance_from_products(dot, nnz_s, float(self.nnz[k]))

    def pairwise(self) -> np.ndarray:
        sg = (self.signs @ self.signs.T).to("cpu", torch.float64).numpy()
        return pairwise_distances(sg)


def make_oracle(grads: Tensor, measure: str, segments: Sequence[int] | None = None
                ) -> DistanceOracle:
    """The oracle of ``measure`` over a stack [M, P]."""
    measure = check_measure(measure)
    if measure == "cosine":
        return GramOracle(gram_matrix(grads))
    if measure == "layerwise":
        return LayerwiseOracle(layer_gram_matrices(grads, segments))
    return SignOracle(grads)


def decide_measure(grads: Tensor, tau: float, rule: str = "mean", measure: str = "cosine",
                   segments: Sequence[int] | None = None, verdicts: np.ndarray | None = None,
                   rule_options: dict | None = None) -> Decision:
    """The decision of ``rule`` over a stack [M, P] with distances of ``measure``."""
    return decide_with(make_oracle(grads, measure, segments), tau, rule, verdicts, rule_options)
