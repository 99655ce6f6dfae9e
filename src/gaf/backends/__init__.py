"""Where a collector keeps a step's micro-gradients and how it filters them.

A :class:`~gaf.collector.GradientCollector` holds one backend, chosen at construction:

* :class:`~gaf.backends.streaming.StreamingBackend`: one running sum, the sequential fold
  applied as each micro-gradient arrives (O(P) memory);
* :class:`~gaf.backends.stacked.StackedBackend`: every micro-gradient as a row of an
  [M, P] buffer, any rule and measure over their Gram matrix (O(M·P));
* :class:`gaf.distributed.backend.DistributedBackend`: the stacked rows of every rank,
  filtered by the distributed protocol.

The interface (docs/design.md, "Front ends")::

    target = backend.begin()                     # zeroed buffer the first backward fills
    backend.collect(k, verdict)                  # take micro-gradient k out of .grad
    result = backend.finish(count, tau, verdicts)  # FilterResult, grad in a reused buffer
"""

from gaf.backends.stacked import StackedBackend
from gaf.backends.streaming import StreamingBackend

__all__ = ["StackedBackend", "StreamingBackend"]
