"""The agreement filter's core: pure functions from micro-gradients to a decision.

Imports torch and numpy only, nothing else of gaf (docs/design.md, "Layering").

Gradient Agreement Filtering (arXiv 2412.18052) compares micro-gradients by cosine
distance D(a, b) = 1 - a·b / (|a| |b|) in [0, 2] and averages only those that agree. The
paper's rule, over g_1 … g_M in order::

    S = {1};  s = g_1
    for k = 2 … M:
        if D(s, g_k) <= tau:  S = S ∪ {k};  s = s + g_k
    if |S| < 2:  skip the step
    else:        direction = s / |S|

Every rule needs only the Gram matrix G = X Xᵀ of the stacked micro-gradients X [M, P]:
for s = Σ w_i g_i, ``s·g_k = (w G)[k]`` and ``|s|² = w G wᵀ``. The decision (O(M²), on
the host in float64) is separated from the data (O(M·P), on the device), so the same
decision code serves one device and many ranks. The rules ("mean", "halving", "anchor",
"neighbours", "consensus"), the robust aggregators, blind controls' ``verdicts`` and how
to add a rule: docs/design.md, "The rules".

A row that is not finite or has zero norm agrees with nothing: never accepted, even at
tau = 2, its distance reported as 2, counted in ``num_invalid`` (if the first row is
invalid, the first valid row is the anchor). Distances are clamped to [0, 2]; ``tau``
must be a finite number in [0, 2]. No decision ever holds NaN.
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

__all__ = ["ANCHORED_RULES", "REGISTRY", "ALL_RULES", "ROBUST_RULES", "RULES", "STREAMING_RULES",
           "ZERO_DISTANCE", "Decision", "DistanceOracle", "FilterResult", "FilterStats", "MEASURES",
           "FoldStep", "GramOracle", "Rule", "check_grads", "check_measure", "check_rule",
           "check_tau", "check_verdicts", "cosine_distance", "decide", "decide_with",
           "direction_buffer", "distance_from_products", "filter_gradients", "fold_coefficients",
           "fold_row", "fold_weights", "get_rule", "gram_dtype", "gram_matrix", "host_dot",
           "pairwise_distances", "register_rule", "result_from_decision", "valid_norm_sq",
           "valid_rows", "valid_vector", "weighted_sum"]
