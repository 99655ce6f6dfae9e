"""``filter_gradients``: one call from a stack of micro-gradients to the filtered direction.

Sits above :mod:`gaf.core.measures` (the agreement measures) and :mod:`gaf.core` (the rules),
so the core imports nothing of gaf (docs/design.md, "Layering").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from gaf.core.decision import FilterResult, result_from_decision
from gaf.core.distance import check_tau
from gaf.core.measures import check_measure, decide_measure
from gaf.core.registry import check_rule, decide
from gaf.core.tensors import check_grads, direction_buffer, gram_matrix, weighted_sum


def filter_gradients(
    grads: Tensor,
    tau: float = 0.97,
    rule: str = "mean",
    measure: str = "cosine",
    segments: Sequence[int] | None = None,
    out: Tensor | None = None,
    verdicts: np.ndarray | None = None,
    rule_options: Mapping | None = None,
) -> FilterResult:
    """Filter a stack of micro-gradients ``grads`` [M, P] (one flat gradient per row).

    Returns a :class:`~gaf.core.FilterResult` whose ``grad`` [P] is the filtered update
    direction in ``grads.dtype`` on ``grads.device``; see :mod:`gaf.core` for the rules.

    ``measure`` picks the agreement measure (:mod:`gaf.core.measures`): "cosine" (default, the
    Gram path), "sign" or "layerwise" (which needs ``segments``, the parameter sizes that
    split a row into tensors). ``out`` [P], if given, receives the direction (a training
    loop reuses one buffer instead of allocating P numbers every step). ``verdicts``
    (bool [M], from a blind control of :mod:`gaf.controls`) replaces each row's test
    ``distance <= tau``; ``rule_options`` are the rule's keyword options. A ``grads``
    that requires grad is detached: the result carries no autograd history. With the cosine
    measure the result's ``extra["gram"]`` is the [M, M] Gram matrix on the host, in float64
    (for :class:`gaf.NoiseScale`).
    """
    # The filter is a selection, not a differentiable function: a stack that requires grad
    # (e.g. rows built from autograd outputs) is filtered as plain numbers.
    grads = check_grads(grads).detach()
    tau = check_tau(tau)
    rule = check_rule(rule)
    gram = None
    if check_measure(measure) == "cosine":
        # The one device→host copy of the step: the decision and extra["gram"] share it.
        gram = gram_matrix(grads).to("cpu", torch.float64)
        decision = decide(gram, tau, rule, verdicts, rule_options)
    else:
        decision = decide_measure(grads, tau, rule, measure, segments, verdicts, rule_options)
    out = direction_buffer(grads, out)
    weighted_sum(grads, decision.weights, out)
    result = result_from_decision(decision, out, tau, rule)
    result.extra["measure"] = measure
    if gram is not None:
        result.extra["gram"] = gram
    return result
