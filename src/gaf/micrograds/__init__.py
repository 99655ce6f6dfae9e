"""How a step's micro-gradients are held: model ``.grad`` ↔ flat rows
(:mod:`~gaf.micrograds.flat`), and the backends behind the one
:class:`~gaf.micrograds.backend.Backend` interface a collector talks to: streaming (one
running sum, O(P)), stacked ([M, P] rows, any rule and measure), one-pass (one forward and
backward), averaging (plain accumulation), and :mod:`gaf.distributed`'s.
"""

from gaf.micrograds.averaging import AveragingBackend
from gaf.micrograds.backend import Backend, BatchPass
from gaf.micrograds.flat import FlatGradients
from gaf.micrograds.one_pass import OnePassBackend
from gaf.micrograds.stacked import StackedBackend
from gaf.micrograds.streaming import StreamingBackend

__all__ = ["AveragingBackend", "Backend", "BatchPass", "FlatGradients", "OnePassBackend",
           "StackedBackend", "StreamingBackend"]
