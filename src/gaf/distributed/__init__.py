"""GAF across torch.distributed ranks: the protocol over the pure core (docs/design.md,
"The distributed protocol"; docs/distributed.md).
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

__all__ = ["BUFFER_SYNC", "GATHERS", "METHODS", "DistributedGAFTrainer",
           "DistributedGradientCollector", "GAFFSDPState", "GAFHookState", "GAFDistributedError",
           "Workspace", "broadcast_parameters", "filter_gradients_distributed", "gaf_hook",
           "sync_buffers"]
