"""GAF across torch.distributed ranks: the protocol of design.md §4 over the pure core.

:mod:`gaf.distributed.protocol` holds the algorithm (:func:`filter_gradients_distributed`,
its traffic arithmetic and failure handling); :mod:`gaf.distributed.frontend` the
``.grad``-level front ends (:class:`DistributedGradientCollector`,
:class:`DistributedGAFTrainer`) and parameter/buffer synchronisation.
"""

from gaf.distributed.frontend import (
    BUFFER_SYNC,
    DistributedGAFTrainer,
    DistributedGradientCollector,
    broadcast_parameters,
    sync_buffers,
)
from gaf.distributed.protocol import (
    METHODS,
    GAFDistributedError,
    Traffic,
    filter_gradients_distributed,
    traffic,
)

__all__ = [
    "BUFFER_SYNC",
    "METHODS",
    "DistributedGAFTrainer",
    "DistributedGradientCollector",
    "GAFDistributedError",
    "Traffic",
    "broadcast_parameters",
    "filter_gradients_distributed",
    "sync_buffers",
    "traffic",
]
