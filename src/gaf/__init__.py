"""gaf: Gradient Agreement Filtering for PyTorch.

The pure core (:mod:`gaf.core`) decides from the Gram matrix of micro-gradients which of
them agree; thin front ends apply that decision on one device (:mod:`gaf.collector`,
:mod:`gaf.training`) and across torch.distributed ranks (:mod:`gaf.distributed`).
"""

from gaf.core import (
    RULES,
    Decision,
    FilterResult,
    cosine_distance,
    decide,
    filter_gradients,
    gram_matrix,
)

__all__ = [
    "RULES",
    "Decision",
    "FilterResult",
    "cosine_distance",
    "decide",
    "filter_gradients",
    "gram_matrix",
]
__version__ = "0.1.0"

from gaf.collector import FilterStats, GradientCollector  # noqa: E402
from gaf.flat import FlatGradients  # noqa: E402
from gaf.one_pass import OnePassFilter, collect_one_pass, one_pass_filter  # noqa: E402
from gaf.thresholds import (  # noqa: E402
    FixedThreshold,
    MovingAverageThreshold,
    NullTailThreshold,
    QuantileThreshold,
    ScheduledThreshold,
    StepThreshold,
    Threshold,
    make_threshold,
    parse_threshold,
)
from gaf.training import GAFTrainer, StepResult  # noqa: E402

__all__ += [
    "FilterStats",
    "FixedThreshold",
    "MovingAverageThreshold",
    "NullTailThreshold",
    "QuantileThreshold",
    "ScheduledThreshold",
    "StepThreshold",
    "make_threshold",
    "parse_threshold",
    "FlatGradients",
    "GAFTrainer",
    "GradientCollector",
    "OnePassFilter",
    "one_pass_filter",
    "collect_one_pass",
    "StepResult",
    "Threshold",
]
