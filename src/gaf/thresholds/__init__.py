"""Thresholds: the tau a filtered step uses, and how it may change over training.

The filter asks a threshold for ``value()`` (pure, a float in [0, 2]) at the start of a
step and tells it the step's :class:`~gaf.core.FilterResult` through ``observe()``, a
deterministic function of host statistics that are identical on every rank, so
thresholds stay in step across ranks without communication. ``observe()`` counts steps,
skipped ones included. Adaptive kinds see only tested distances
(:func:`tested_distances`), in the units of whatever measure produced them. The kinds:
docs/thresholds-and-measures.md.
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

__all__ = ["THRESHOLDS", "FixedThreshold", "MovingAverageThreshold", "NullTailThreshold",
           "QuantileThreshold", "ScheduledThreshold", "StepThreshold", "Threshold", "as_threshold",
           "make_threshold", "parse_threshold", "tested_distances"]
