"""The agreement filter's core: pure functions from micro-gradients to a decision.

Imports torch and numpy only, nothing else of gaf (docs/design.md, "Layering"). Its
modules: :mod:`~gaf.core.distance` (distances from products, checks),
:mod:`~gaf.core.tensors` (Gram matrix, weighted sum: the data side),
:mod:`~gaf.core.decision` (Decision, FilterResult, distance oracles),
:mod:`~gaf.core.rules` (every rule, the sequential one as a fold) and
:mod:`~gaf.core.registry` (the list of rules and :func:`decide`),
:mod:`~gaf.core.measures` (other agreement measures), :mod:`~gaf.core.coordinatewise`
(median and trimmed mean) and :mod:`~gaf.core.filter` (:func:`filter_gradients`, one call
from a stack [M, P] to the filtered direction).

Gradient Agreement Filtering (Chaubard, Eddy, Kochenderfer, arXiv 2412.18052) compares
micro-gradients by cosine distance

    D(a, b) = 1 - a·b / (|a| |b|)            in [0, 2]

and averages only those that agree. The paper's rule, over g_1 … g_M in order::

    S = {1};  s = g_1
    for k = 2 … M:
        if D(s, g_k) <= tau:  S = S ∪ {k};  s = s + g_k
    if |S| < 2:  skip the step
    else:        direction = s / |S|

Every rule here needs only the Gram matrix G = X Xᵀ of the stacked micro-gradients
X [M, P]: for a weighted sum s = Σ w_i g_i, ``s·g_k = (w G)[k]`` and ``|s|² = w G wᵀ``.
The decision (O(M²), on the host in float64) is therefore separated from the data
(O(M·P), on the gradients' device), so the same decision code serves one device and many
ranks, and every rank reaches the same decision from the same G without a broadcast.

Rules (``rule=``):

``"mean"``        the paper's rule above (default).
``"halving"``     as "mean", but the running direction is halved on every acceptance,
                  ``s = (s + g_k) / 2`` (the authors' package): later rows weigh more and
                  the result is ``s`` itself, not a plain mean.
``"anchor"``      each g_k is compared with the anchor g_1 only; result is the mean of
                  the accepted rows.
``"neighbours"``  the row with the most neighbours within tau (ties: lowest index) is the
                  anchor; it and its neighbours are accepted; result is their mean.
``"consensus"``   every valid g_k is compared with the sum of all the other valid rows,
                  D(g_k, S - g_k) with S = Σ_valid g_j; accepted when <= tau; no row is
                  privileged. Result is the mean of the accepted rows (skip below two).
                  From G: (S - g_k)·g_k = (G1)_k - G_kk and
                  |S - g_k|² = 1ᵀG1 - 2 (G1)_k + G_kk. ``anchor`` is -1 (there is none)
                  and ``distances[k]`` is D(g_k, S - g_k) for every valid row.

For M = 2 all five coincide.

Robust aggregators (:mod:`gaf.core.robust`, :data:`ROBUST_RULES`), also functions of G
alone, with options (``rule_options=``) and no tau: ``"multi-krum"`` (Blanchard et al.
2017) and ``"geometric-median"`` (smoothed Weiszfeld, as in RFA).

Blind controls (:mod:`gaf.controls`) pass ``verdicts``, a bool per row drawn without
looking at the gradients: the test ``distance <= tau`` is then replaced by ``verdicts[k]``
for every row the rule tests, and everything else (validity, the anchor, distances,
weights) stays the rule's own. The anchor of the anchored rules is accepted whatever its
verdict; under "neighbours" a control keeps the first valid row as the anchor (choosing
the row with most neighbours would look at the gradients).

Deliberate choices:

* A row that is not finite or has zero norm agrees with nothing: it is never accepted,
  even at tau = 2, its distance is reported as 2 (the maximum), and it is counted in
  ``num_invalid``. The same convention holds for every distance computed here (and in
  :mod:`gaf.reference`): a zero vector has no direction, so its distance to anything is 2.
  (A running sum can become zero, e.g. g and -g accepted at tau = 2; the next row is then
  accepted only at tau = 2.) If the first row is invalid, the first valid row becomes the anchor.
  This keeps every decision free of NaN.
* Distances are clamped to [0, 2], so tau = 2 accepts every valid row despite rounding.
* ``tau`` must be a finite number in [0, 2].

Adding a rule: a function ``rule(oracle, tau, valid, verdicts, **options) -> Decision``
in a module of this package, and one :class:`Rule` entry in :mod:`gaf.core.registry`
(options arrive from ``rule_options=``); see docs/design.md, "Adding a rule".
"""

from gaf.core.decision import (
    Decision,
    DistanceOracle,
    FilterResult,
    FilterStats,
    GramOracle,
    check_verdicts,
    result_from_decision,
)
from gaf.core.distance import (
    ZERO_DISTANCE,
    check_tau,
    distance_from_products,
    pairwise_distances,
    valid_norm_sq,
    valid_rows,
    valid_vector,
)
from gaf.core.filter import filter_gradients
from gaf.core.measures import MEASURES, check_measure
from gaf.core.registry import (
    ALL_RULES,
    ANCHORED_RULES,
    REGISTRY,
    ROBUST_RULES,
    RULES,
    STREAMING_RULES,
    Rule,
    check_rule,
    decide,
    decide_with,
    get_rule,
    register_rule,
)
from gaf.core.rules import FoldStep, fold_coefficients, fold_row, fold_weights
from gaf.core.tensors import (
    check_grads,
    cosine_distance,
    direction_buffer,
    gram_dtype,
    gram_matrix,
    host_dot,
    weighted_sum,
)

__all__ = [
    "ANCHORED_RULES",
    "REGISTRY",
    "ALL_RULES",
    "ROBUST_RULES",
    "RULES",
    "STREAMING_RULES",
    "ZERO_DISTANCE",
    "Decision",
    "DistanceOracle",
    "FilterResult",
    "FilterStats",
    "MEASURES",
    "FoldStep",
    "GramOracle",
    "Rule",
    "check_grads",
    "check_measure",
    "check_rule",
    "check_tau",
    "check_verdicts",
    "cosine_distance",
    "decide",
    "decide_with",
    "direction_buffer",
    "distance_from_products",
    "filter_gradients",
    "fold_coefficients",
    "fold_row",
    "fold_weights",
    "get_rule",
    "gram_dtype",
    "gram_matrix",
    "host_dot",
    "pairwise_distances",
    "register_rule",
    "result_from_decision",
    "valid_norm_sq",
    "valid_rows",
    "valid_vector",
    "weighted_sum",
]
