"""GAF inside the training stacks people use (docs/integrations.md).

Each submodule imports its framework only when imported itself: ``lightning``
(``GAFCallback``), ``transformers`` (``GAFHFTrainer``), ``accelerate``
(``GAFAccumulator``), ``tensorboard`` (``StatsLogger``); extra ``gaf[integrations]``
installs all four. Each accumulation micro-batch is one micro-gradient, and a skipped
step never reaches ``optimizer.step()``.
"""

from gaf.integrations.common import step_statistics

__all__ = ["step_statistics"]
