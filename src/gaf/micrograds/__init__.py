"""How a step's micro-gradients are held: model ``.grad`` ↔ flat rows, and the backends.

Every backend implements :class:`~gaf.micrograds.backend.Backend`, the one interface a
:class:`~gaf.collector.GradientCollector` talks to:

* :class:`~gaf.micrograds.streaming.StreamingBackend`: one running sum, the sequential fold
  applied as each micro-gradient arrives (O(P) memory);
* :class:`~gaf.micrograds.stacked.StackedBackend`: every micro-gradient as a row of an
  [M, P] buffer, any rule and measure over their Gram matrix (O(M·P));
* :class:`~gaf.micrograds.one_pass.OnePassBackend`: the Gram matrix and the direction from
  one forward and backward of the whole batch;
* :class:`~gaf.micrograds.averaging.AveragingBackend`: plain gradient accumulation;
* :class:`gaf.distributed.backend.DistributedBackend`: the stacked rows of every rank,
  filtered by the distributed protocol.

:mod:`~gaf.micrograds.flat` maps ``.grad`` to flat rows and back; :mod:`~gaf.micrograds.vmap`
computes micro-gradients with ``torch.func`` instead of backward passes.
"""

from gaf.micrograds.averaging import AveragingBackend
from gaf.micrograds.backend import Backend, BatchPass
from gaf.micrograds.flat import FlatGradients
from gaf.micrograds.one_pass import OnePassBackend
from gaf.micrograds.stacked import StackedBackend
from gaf.micrograds.streaming import StreamingBackend

__all__ = [
    "AveragingBackend",
    "Backend",
    "BatchPass",
    "FlatGradients",
    "OnePassBackend",
    "StackedBackend",
    "StreamingBackend",
]
