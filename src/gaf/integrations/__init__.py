"""GAF inside the training stacks people use.

Each submodule imports its framework when it is imported, never before, so
``import gaf.integrations`` (and the core) needs none of them:

- :mod:`gaf.integrations.lightning`: :class:`~gaf.integrations.lightning.GAFCallback` for
  PyTorch Lightning's automatic optimisation with ``accumulate_grad_batches`` (extra
  ``gaf[lightning]``);
- :mod:`gaf.integrations.transformers`: :class:`~gaf.integrations.transformers.GAFHFTrainer`,
  a Hugging Face ``Trainer`` with ``gradient_accumulation_steps`` (extra ``gaf[transformers]``);
- :mod:`gaf.integrations.accelerate`: :class:`~gaf.integrations.accelerate.GAFAccumulator`
  for loops written with ``accelerator.accumulate`` (extra ``gaf[accelerate]``);
- :mod:`gaf.integrations.tensorboard`: :class:`~gaf.integrations.tensorboard.StatsLogger`,
  TensorBoard and CSV logs of GAF statistics (extra ``gaf[tensorboard]``).

``gaf[integrations]`` installs all four. In every integration each accumulation
micro-batch is one micro-gradient, the filtered direction replaces the accumulated gradient,
and a skipped step never reaches ``optimizer.step()``: parameters and optimizer state
(momentum, Adam's step count) stay as they were.
"""

from gaf.integrations.common import step_statistics

__all__ = ["step_statistics"]
