"""GAF for the Hugging Face ``Trainer``: a subclass with ``gradient_accumulation_steps``::

    args = TrainingArguments(output_dir, gradient_accumulation_steps=M, max_grad_norm=1.0, ...)
    trainer = GAFHFTrainer(model=model, args=args, train_dataset=train, tau=0.97)
    trainer.train()

Each micro-batch of a step is one micro-gradient; the window's last backward filters and
sets ``.grad`` = M · (mean of the accepted ones), undoing the Trainer's division (where it
normalises by ``num_items_in_batch``, the mean is in that normalisation). A skipped step
sets accelerate's skip flag, so the Trainer holds the LR scheduler. Several processes go
through :class:`gaf.integrations.accelerate.GAFAccumulator`. Checkpoint folders get
``gaf_state.pt``. Logs, pitfalls: docs/integrations.md.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from gaf.core import FilterStats
from gaf.integrations.accelerate import GAFAccumulator
from gaf.spec import SPEC_DEFAULTS, FilterSpec, resolve_spec

__all__ = ["GAF_STATE_NAME", "GAFHFTrainer"]

GAF_STATE_NAME = "gaf_state.pt"  # beside the Trainer's own files in each checkpoint folder


class GAFHFTrainer(Trainer):
    """``transformers.Trainer`` that filters each step's micro-gradients with GAF. Takes
    every ``Trainer`` argument plus, keyword-only, ``spec`` (or its keyword sugar), ``mode``,
    ``method`` and ``timeout`` (as for :class:`~gaf.integrations.accelerate.GAFAccumulator`)."""

    def __init__(self, *args: Any, spec: FilterSpec | None = None, mode: str = "auto",
                 method: str = "sharded", timeout: float | None = None, **kwargs: Any):
        # The filter's keyword sugar, taken out before the rest goes to Trainer.
        filter_options = {k: kwargs.pop(k) for k in SPEC_DEFAULTS if k in kwargs}
        spec = resolve_spec(spec, **filter_options)
        super().__init__(*args, **kwargs)
        self.gaf_options = dict(spec=spec, mode=mode, method=method, timeout=timeout)
        self.gaf: GAFAccumulator | None = None
        self._gaf_resume: dict | None = None

    @property
    def gaf_stats(self) -> FilterStats:
        """Running counters of the collector (steps, skipped steps, accepted micro-batches)."""
        if self.gaf is None:
            raise RuntimeError("gaf_stats is available once training has started")
        return self.gaf.stats

    def _start_gaf(self, model: torch.nn.Module) -> None:
        # The first training_step comes after accelerate prepared the model and optimizer
        # and before any backward: the moment the DDP hook and the step guard need.
        if self.args.gradient_accumulation_steps * self.accelerator.num_processes < 2:
            raise ValueError(
                "GAF needs at least two micro-gradients per step: set "
                "gradient_accumulation_steps >= 2 in TrainingArguments"
            )
        # The Trainer accumulates by itself (its Accelerator has gradient_accumulation_steps 1).
        self.gaf = GAFAccumulator(self.accelerator, model, self.optimizer,
                                  num_micro_batches=self.args.gradient_accumulation_steps,
                                  **self.gaf_options)
        if self._gaf_resume is not None:
            self.gaf.load_state_dict(self._gaf_resume)
            self._gaf_resume = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.gaf is None or self.gaf.optimizer is not self.optimizer:
            self._start_gaf(model)
        self.gaf.before_backward()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.gaf.after_backward(loss_divisor=self.current_gradient_accumulation_steps)
        return loss

    # Checkpoints: the GAF counters and the threshold's state (an adaptive threshold learns)
    # go with the Trainer's own checkpoint files and come back on resume_from_checkpoint.
    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.gaf is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            torch.save(self.gaf.state_dict(), os.path.join(folder, GAF_STATE_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, GAF_STATE_NAME)
        if os.path.isfile(path):
            # Written by _save_checkpoint above: counters and threshold state, no code.
            self._gaf_resume = torch.load(path, weights_only=False)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.gaf is not None and "loss" in logs:  # the training logs, not eval's
            logs = {**logs, **self.gaf.log_row()}
        super().log(logs, start_time)
