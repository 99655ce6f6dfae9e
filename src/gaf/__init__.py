"""gaf: Gradient Agreement Filtering for PyTorch.

The pure core (:mod:`gaf.core`) decides from the Gram matrix of micro-gradients which of
them agree; :class:`gaf.FilterSpec` says how to filter; the backends of
:mod:`gaf.micrograds` hold a step's micro-gradients (streaming, stacked, one pass); thin
front ends apply the decision on one device (:mod:`gaf.collector`, :mod:`gaf.training`)
and across torch.distributed ranks (:mod:`gaf.distributed`). Blind
controls (:mod:`gaf.controls`) take the same step with the choice made at random.
See docs/design.md for the method, the rules and the layering.
"""

from gaf.collector import GradientCollector
from gaf.controls import Control, RandomDrop, RandomSkip
from gaf.core import (
    ALL_RULES,
    ROBUST_RULES,
    RULES,
    Decision,
    FilterResult,
    FilterStats,
    cosine_distance,
    decide,
    filter_gradients,
    gram_matrix,
)
from gaf.micrograds import Backend, FlatGradients
from gaf.noise_scale import NoiseScale
from gaf.spec import FilterSpec, resolve_spec
from gaf.thresholds import (
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
from gaf.training import (
    GAFTrainer,
    OnePassFilter,
    StepResult,
    collect_one_pass,
    one_pass_filter,
)

# The one source of the version: pyproject.toml reads it from here.
__version__ = "0.1.0"

__all__ = [
    "ALL_RULES",
    "ROBUST_RULES",
    "RULES",
    "Backend",
    "Control",
    "Decision",
    "FilterResult",
    "FilterSpec",
    "FilterStats",
    "FixedThreshold",
    "FlatGradients",
    "GAFTrainer",
    "GradientCollector",
    "MovingAverageThreshold",
    "NoiseScale",
    "NullTailThreshold",
    "OnePassFilter",
    "QuantileThreshold",
    "RandomDrop",
    "RandomSkip",
    "ScheduledThreshold",
    "StepResult",
    "StepThreshold",
    "Threshold",
    "collect_one_pass",
    "cosine_distance",
    "decide",
    "filter_gradients",
    "gram_matrix",
    "make_threshold",
    "one_pass_filter",
    "parse_threshold",
    "resolve_spec",
]
