"""GAFHFTrainer: the real Hugging Face Trainer ends where GAFTrainer ends."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainingArguments

import gaf
from gaf.integrations.transformers import GAFHFTrainer

from .tiny import (
    assert_same_tensors,
    check_two_rank_run,
    make_data,
    make_net,
    optimizer_state_tensors,
    reference_run,
)

MICRO, M, TAU = 4, 2, 0.9


class Classifier(nn.Module):
    """The shape the Trainer expects: keyword inputs, a dict with the loss."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class Rows(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def make_optimizer(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def make_scheduler(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)


def training_args(tmp_path, **kwargs):
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=M, num_train_epochs=1, max_grad_norm=0.5, logging_steps=4,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
        train_sampling_strategy="sequential", dataloader_num_workers=0,
    )
    return TrainingArguments(**{**settings, **kwargs})


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_transformers_trainer_matches_gaftrainer_and_holds_scheduler(bf16, tmp_path):
    x, y = make_data(64)
    model = Classifier(make_net())
    optimizer = make_optimizer(model.parameters())
    scheduler = make_scheduler(optimizer)
    trainer = GAFHFTrainer(model=model, args=training_args(tmp_path, bf16=bf16),
                           train_dataset=Rows(x, y), optimizers=(optimizer, scheduler), tau=TAU)
    trainer.train()

    net = make_net()
    ref_optimizer = make_optimizer(net.parameters())
    ref_scheduler = make_scheduler(ref_optimizer)
    ref = reference_run(net, ref_optimizer, x, y, micro_batch=MICRO, num_micro_batches=M,
                        tau=TAU, scheduler=ref_scheduler, max_grad_norm=0.5,
                        autocast_dtype=torch.bfloat16 if bf16 else None)
    assert 0 < ref.stats.skipped_steps < ref.stats.steps
    assert trainer.gaf_stats == ref.stats
    assert_same_tensors(model.net.parameters(), net.parameters(), "parameters")
    assert_same_tensors(optimizer_state_tensors(optimizer), optimizer_state_tensors(ref_optimizer),
                        "optimizer state")
    # The Trainer's own skip check held the scheduler on every skipped step.
    assert scheduler.last_epoch == ref_scheduler.last_epoch
    assert trainer.state.global_step == ref.stats.steps
    logs = [row for row in trainer.state.log_history if "gaf/skipped" in row]
    assert len(logs) == 2  # logging_steps=4 over 8 steps
    skipped = sum(row["gaf/skipped"] * 4 for row in logs)
    assert skipped == pytest.approx(ref.stats.skipped_steps)
    assert logs[-1]["gaf/skipped_steps"] == ref.stats.skipped_steps


def test_transformers_trainer_two_processes_gloo_matches_distributed_gaftrainer(tmp_path):

    check_two_rank_run("transformers", tmp_path, micro_batches_per_rank=M)


def test_transformers_resume_from_checkpoint_carries_the_gaf_state(tmp_path):
    x, y = make_data(64)

    def run(out, **kwargs):
        model = Classifier(make_net())
        optimizer = make_optimizer(model.parameters())
        args = training_args(out, save_strategy="steps", save_steps=4)
        trainer = GAFHFTrainer(model=model, args=args, train_dataset=Rows(x, y),
                               optimizers=(optimizer, make_scheduler(optimizer)),
                               tau=gaf.MovingAverageThreshold(k=0.5, window=8, initial=0.9))
        trainer.train(**kwargs)
        return model, trainer

    whole_model, whole = run(tmp_path / "whole")
    resumed_model, resumed = run(tmp_path / "whole",
                                 resume_from_checkpoint=str(tmp_path / "whole/checkpoint-4"))
    assert 0 < whole.gaf_stats.skipped_steps < whole.gaf_stats.steps
    assert resumed.gaf_stats == whole.gaf_stats
    assert (resumed.gaf.collector.threshold.state_dict()
            == whole.gaf.collector.threshold.state_dict())
    assert_same_tensors(resumed_model.parameters(), whole_model.parameters(), "parameters")


def test_trainer_built_scheduler_gives_no_overridden_step_warning(tmp_path):
    # The Trainer builds its scheduler (and torch's scheduler wraps optimizer.step) before
    # GAF installs its skip guard at the first micro-batch; the guard keeps the scheduler's
    # wrapper, so torch's "optimizer.step() has been overridden" warning must not appear,
    # and the learning rate still decays once per taken step.
    x, y = make_data(64)
    model = Classifier(make_net())
    args = training_args(tmp_path, lr_scheduler_type="linear", learning_rate=0.1)
    trainer = GAFHFTrainer(model=model, args=args, train_dataset=Rows(x, y), tau=TAU)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    texts = [str(w.message) for w in caught]
    assert not [t for t in texts if "overridden" in t or "before `optimizer.step()`" in t], texts
    stats = trainer.gaf_stats
    assert 0 < stats.skipped_steps < stats.steps
    # linear decay to 0 over the windows: one scheduler step per taken step only
    taken = stats.steps - stats.skipped_steps
    expected = 0.1 * (1 - taken / stats.steps)
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(expected)
