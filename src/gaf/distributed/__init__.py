"""GAF across torch.distributed ranks: the protocol over the pure core (docs/design.md,
"The distributed protocol").

:mod:`~gaf.distributed.comm` the communicator, its errors and reusable buffers;
:mod:`~gaf.distributed.settings_check` the cross-rank settings check;
:mod:`~gaf.distributed.protocol` the sharded exchange (:func:`filter_gradients_distributed`);
:mod:`~gaf.distributed.backend` the collector backend over it; and
:mod:`~gaf.distributed.frontend` the ``.grad``-level front ends
(:class:`DistributedGradientCollector`, :class:`DistributedGAFTrainer`) with
parameter/buffer synchronisation. Inside the engines' own exchange:
:mod:`~gaf.distributed.ddp_hook` (:class:`GAFHookState`, :func:`gaf_hook`, a DDP
communication hook) and :mod:`~gaf.distributed.fsdp` (:class:`GAFFSDPState`, FSDP2's
reduce-scatter), over :mod:`~gaf.distributed.step_state` and
:mod:`~gaf.distributed.shard_exchange`.
"""

from gaf.distributed.comm import GAFDistributedError, Workspace
from gaf.distributed.ddp_hook import GAFHookState, gaf_hook
from gaf.distributed.frontend import (
    BUFFER_SYNC,
    DistributedGAFTrainer,
    DistributedGradientCollector,
    broadcast_parameters,
    sync_buffers,
)
from gaf.distributed.fsdp import GAFFSDPState
from gaf.distributed.protocol import GATHERS, filter_gradients_distributed
from gaf.distributed.settings_check import METHODS

__all__ = [
    "BUFFER_SYNC",
    "GATHERS",
    "METHODS",
    "DistributedGAFTrainer",
    "DistributedGradientCollector",
    "GAFFSDPState",
    "GAFHookState",
    "GAFDistributedError",
    "Workspace",
    "broadcast_parameters",
    "filter_gradients_distributed",
    "gaf_hook",
    "sync_buffers",
]
