"""Thresholds: the tau a filtered step uses, and how it may change over training.

A threshold is a small stateful object. The filter asks it for ``value()`` once at the
start of a step and tells it the step's :class:`~gaf.core.FilterResult` through
``observe()`` afterwards. Every statistic it sees lives on the host and is identical on
every rank (it is derived from the same all-reduced Gram matrix), so thresholds stay in
step across ranks without communication. State round-trips through ``state_dict()``.

Contract every threshold here keeps:

* ``value()`` is pure (it may be called any number of times) and returns a float in
  [0, 2]; all change happens in ``observe()``.
* ``observe()`` is a deterministic function of the results it is given: no randomness,
  no clock, no rank-local data. Two instances fed the same results agree exactly, which
  is what keeps ranks in step.
* Steps are counted in ``observe()``, skipped steps included (as the toolkit counts
  learning-rate steps).

Kinds:

``FixedThreshold(tau)``                   the paper's constant tau.
``ScheduledThreshold(start, end, total_steps, schedule="linear"|"cosine")``
                                           tau moves from start to end over training,
                                           then stays at end.
``StepThreshold(values, milestones)``     piecewise constant: values[i] after the i-th
                                           milestone (a step count).
``MovingAverageThreshold(k, window, tau_max)``
                                           tau_t = clip(mean + k·std, tau_min, tau_max)
                                           of the last ``window`` measured distances.
``QuantileThreshold(target_acceptance, window)``
                                           tau_t = the target_acceptance-quantile of the
                                           last ``window`` distances, so about that
                                           fraction of tested micro-gradients is accepted.
``NullTailThreshold(z, window)``          a significance test (see its docstring): the
                                           spread of agreement that chance alone produces
                                           is estimated from the micro-gradients that point
                                           *away* from each other, and tau_t = 1 - z·σ̂.

The adaptive kinds see only "tested" distances: rows that were actually compared (valid
rows other than the anchor), so the anchor's 0 and an invalid row's 2 never enter a
statistic. They work in the units of whatever measure produced the distances (cosine,
sign, layerwise), which is what lets one rule serve every measure.
"""

from gaf.thresholds.kinds import (
    FixedThreshold,
    MovingAverageThreshold,
    NullTailThreshold,
    QuantileThreshold,
    ScheduledThreshold,
    StepThreshold,
    Threshold,
    as_threshold,
    tested_distances,
)
from gaf.thresholds.names import THRESHOLDS, make_threshold, parse_threshold

__all__ = [
    "THRESHOLDS",
    "FixedThreshold",
    "MovingAverageThreshold",
    "NullTailThreshold",
    "QuantileThreshold",
    "ScheduledThreshold",
    "StepThreshold",
    "Threshold",
    "as_threshold",
    "make_threshold",
    "parse_threshold",
    "tested_distances",
]
