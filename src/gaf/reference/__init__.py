"""Slow, obviously correct float64 references beside every fast path, written from the
definitions on the rows themselves (no Gram matrix, no incremental bookkeeping) so that
tests can check the fast paths against them: :mod:`~gaf.reference.agreement` (the
agreement rules), :mod:`~gaf.reference.robust` (the robust aggregators). O(M²·P) or worse.
"""

from gaf.reference.agreement import reference_distance, reference_filter
from gaf.reference.robust import (
    reference_coordinatewise,
    reference_geometric_median,
    reference_multi_krum,
)

__all__ = ["reference_coordinatewise", "reference_distance", "reference_filter",
           "reference_geometric_median", "reference_multi_krum"]
