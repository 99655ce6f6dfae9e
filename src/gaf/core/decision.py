"""What a rule decides (:class:`Decision`), what a filtered step returns (:class:`FilterResult`),
and the distance oracles the rules ask (cosine from the Gram matrix here; the other
measures in :mod:`gaf.core.measures`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

from gaf.core.distance import distance_from_products, pairwise_distances, valid_rows


class _Acceptance:
    """``num_accepted`` and ``skipped`` of a :class:`Decision` or :class:`FilterResult`."""

    @property
    def num_accepted(self) -> int:
        return int(self.accepted.sum())

    @property
    def skipped(self) -> bool:
        return self.num_accepted < self.min_accepted


@dataclass
class Decision(_Acceptance):
    """What a rule decided over M micro-gradients, on the host.

    ``weights`` gives the update direction as Σ_i weights[i] · g_i; rejected rows have
    weight 0. ``distances[k]`` is the distance row k had when it was tested (0 for the
    anchor, 2 for invalid rows). ``anchor`` is the anchor row's index, -1 if no row was
    valid or the rule has no anchor ("consensus"). The step is skipped when fewer than
    ``min_accepted`` rows are accepted: 2 for the agreement rules (one row agrees with
    nothing), 1 for the robust aggregators of :mod:`gaf.core.robust` (Krum keeps one row).
    """

    accepted: np.ndarray  # bool [M]
    weights: np.ndarray  # float64 [M]
    distances: np.ndarray  # float64 [M]
    anchor: int
    valid: np.ndarray  # bool [M]: finite with non-zero norm
    finite: np.ndarray | None = None  # bool [M]: finite (None: same as valid)
    min_accepted: int = 2


def nothing_valid(valid: np.ndarray, finite: np.ndarray | None = None) -> Decision:
    """The decision when no row can take part: nothing accepted, every distance 2."""
    m = len(valid)
    return Decision(np.zeros(m, dtype=bool), np.zeros(m), np.full(m, 2.0), -1, valid, finite)


def check_verdicts(verdicts: object, m: int) -> np.ndarray | None:
    """``verdicts`` (a blind control's, :mod:`gaf.controls`) as a bool array of length
    ``m``; None stays None."""
    if verdicts is None:
        return None
    v = np.asarray(verdicts)
    if v.shape != (m,) or v.dtype != np.bool_:
        raise ValueError(
            f"verdicts must be a bool array with one entry per row ({m}), got dtype "
            f"{v.dtype} and shape {v.shape}"
        )
    return v


class DistanceOracle:
    """Answers the questions the rules ask, for one agreement measure over M rows.

    ``valid`` [M] marks rows that take part (finite, non-zero); ``finite`` [M] rows without
    inf/NaN. :meth:`to_sum` is the distance between Σ weights[i] g_i and g_k; :meth:`pairwise`
    the [M, M] distances between rows. An oracle that can also give the products behind
    a cosine distance (:meth:`products`) lets the sequential rules fold over them.
    """

    valid: np.ndarray
    finite: np.ndarray
    gram: np.ndarray | None = None  # the Gram matrix, for rules that need it (cosine only)

    def to_sum(self, weights: np.ndarray, k: int) -> float:
        raise NotImplementedError

    def pairwise(self) -> np.ndarray:
        raise NotImplementedError

    def products(self, weights: np.ndarray, k: int) -> tuple[float, float, float] | None:
        """(s·g_k, |s|², |g_k|²) for s = Σ weights[i] g_i, or None if the measure is not
        a cosine of those."""
        return None


class GramOracle(DistanceOracle):
    """Cosine distance from the Gram matrix: s·g_k = (w G)[k] and |s|² = w G wᵀ."""

    def __init__(self, gram: Tensor | np.ndarray):
        g = gram.detach().to("cpu", torch.float64).numpy() if isinstance(gram, Tensor) else gram
        g = np.asarray(g, dtype=np.float64)
        if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] == 0:
            raise ValueError(f"gram must be a non-empty square matrix, got shape {g.shape}")
        self.finite = np.isfinite(np.diag(g))
        self.valid = valid_rows(g)
        # Invalid rows/columns zeroed so no NaN reaches any arithmetic below.
        self.g = np.where(self.valid[:, None] & self.valid[None, :], g, 0.0)
        self.gram = self.g

    def products(self, weights: np.ndarray, k: int) -> tuple[float, float, float]:
        g = self.g
        return float(weights @ g[:, k]), float(weights @ g @ weights), float(g[k, k])

    def to_sum(self, weights: np.ndarray, k: int) -> float:
        return distance_from_products(*self.products(weights, k))

    def pairwise(self) -> np.ndarray:
        return pairwise_distances(self.g)


@dataclass
class FilterResult(_Acceptance):
    """Outcome of filtering M micro-gradients.

    ``grad`` is the update direction Σ w_i g_i (the mean of the accepted rows, except for
    the "halving" rule); when ``skipped`` the optimizer must not step. When every row is
    invalid ``grad`` is zero. Statistics live on the host (numpy/tensor on CPU): reading
    them costs no device synchronisation.
    """

    grad: Tensor
    accepted: Tensor  # bool [M], CPU
    distances: Tensor  # float64 [M], CPU
    weights: Tensor  # float64 [M], CPU
    anchor: int
    num_invalid: int  # rows that agree with nothing: non-finite or zero norm
    tau: float
    rule: str
    num_nonfinite: int = 0  # of those, rows holding inf or NaN (e.g. an AMP overflow)
    extra: dict = field(default_factory=dict)
    # bool [M], CPU: rows that took part (finite, non-zero). Lets adaptive thresholds tell a
    # real distance of 2 from the 2 reported for an invalid row. None: not recorded.
    valid: Tensor | None = None
    min_accepted: int = 2  # skipped below this many accepted rows (see Decision)

    @property
    def num_micro_batches(self) -> int:
        return int(self.accepted.numel())

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / max(1, self.num_micro_batches)


def result_from_decision(decision: Decision, grad: Tensor, tau: float, rule: str) -> FilterResult:
    return FilterResult(
        grad=grad,
        accepted=torch.from_numpy(decision.accepted.copy()),
        distances=torch.from_numpy(decision.distances.copy()),
        weights=torch.from_numpy(decision.weights.copy()),
        anchor=decision.anchor,
        num_invalid=int((~decision.valid).sum()),
        tau=tau,
        rule=rule,
        num_nonfinite=int((~decision.finite).sum()) if decision.finite is not None else 0,
        valid=torch.from_numpy(np.asarray(decision.valid, dtype=bool).copy()),
        min_accepted=decision.min_accepted,
    )


@dataclass
class FilterStats:
    """Running counters over filtered steps (host integers: no device sync to read)."""

    steps: int = 0
    skipped_steps: int = 0
    micro_batches: int = 0
    accepted: int = 0
    invalid: int = 0
    nonfinite: int = 0

    def update(self, result: FilterResult) -> None:
        self.steps += 1
        self.skipped_steps += int(result.skipped)
        self.micro_batches += result.num_micro_batches
        self.accepted += result.num_accepted
        self.invalid += result.num_invalid
        self.nonfinite += result.num_nonfinite

    @property
    def skip_rate(self) -> float:
        return self.skipped_steps / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.micro_batches if self.micro_batches else 0.0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if not hasattr(self, key):
                raise KeyError(f"unknown FilterStats field {key!r}")
            setattr(self, key, int(value))
