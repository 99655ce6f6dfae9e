"""GAFAccumulator in real accelerate loops ends where GAFTrainer ends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

import gaf
from gaf.integrations.accelerate import GAFAccumulator

from .tiny import (
    assert_same_tensors,
    check_two_rank_run,
    make_data,
    make_net,
    optimizer_state_tensors,
    reference_run,
)

MICRO, M, TAU = 4, 2, 0.9


def make_optimizer(params):
    return torch.optim.Adam(params, lr=0.01)


def make_scheduler(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_accelerate_loop_matches_gaftrainer_and_holds_scheduler(mixed_precision):
    x, y = make_data(64)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=M,
                              mixed_precision=mixed_precision)
    net = make_net()
    optimizer = make_optimizer(net.parameters())
    loader = DataLoader(TensorDataset(x, y), batch_size=MICRO, shuffle=False)
    model, optimizer, loader, scheduler = accelerator.prepare(
        net, optimizer, loader, make_scheduler(optimizer))
    gaf_step = GAFAccumulator(accelerator, model, optimizer, tau=TAU)
    skipped_seen = 0
    for xb, yb in loader:
        with accelerator.accumulate(model):
            gaf_step.before_backward()
            accelerator.backward(F.cross_entropy(model(xb), yb))
            gaf_step.after_backward()
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
            skipped_seen += int(accelerator.sync_gradients
                                and accelerator.optimizer_step_was_skipped)
            scheduler.step()
            optimizer.zero_grad()

    ref_net = make_net()
    ref_optimizer = make_optimizer(ref_net.parameters())
    ref_scheduler = make_scheduler(ref_optimizer)
    autocast = torch.bfloat16 if mixed_precision == "bf16" else None
    ref = reference_run(ref_net, ref_optimizer, x, y, micro_batch=MICRO, num_micro_batches=M,
                        tau=TAU, scheduler=ref_scheduler, max_grad_norm=0.5,
                        autocast_dtype=autocast)
    assert 0 < ref.stats.skipped_steps < ref.stats.steps
    assert gaf_step.stats == ref.stats
    assert skipped_seen == ref.stats.skipped_steps  # accelerate's own flag reported each skip
    assert scheduler.scheduler.last_epoch == ref_scheduler.last_epoch
    assert_same_tensors(net.parameters(), ref_net.parameters(), "parameters")
    assert_same_tensors(optimizer_state_tensors(optimizer.optimizer),
                        optimizer_state_tensors(ref_optimizer), "optimizer state")
    row = gaf_step.log_row()
    assert row["gaf/skipped"] == pytest.approx(ref.stats.skip_rate)
    assert gaf_step.log_row() == {}


def test_accelerate_step_without_after_backward_is_refused():
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=M)
    net = make_net()
    model, optimizer = accelerator.prepare(net, make_optimizer(net.parameters()))
    GAFAccumulator(accelerator, model, optimizer, tau=TAU)
    x, y = make_data(MICRO)
    accelerator.gradient_state._set_sync_gradients(True)
    accelerator.backward(F.cross_entropy(model(x), y))
    with pytest.raises(RuntimeError, match="after_backward"):
        optimizer.step()


def test_accelerate_two_processes_gloo_matches_distributed_gaftrainer(tmp_path):
    check_two_rank_run("accelerate", tmp_path, micro_batches_per_rank=M)


def test_accelerate_save_state_carries_the_gaf_state(tmp_path):
    x, y = make_data(64)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=M)
    net = make_net()
    model, optimizer = accelerator.prepare(net, make_optimizer(net.parameters()))
    gaf_step = GAFAccumulator(accelerator, model, optimizer, tau=TAU)
    accelerator.register_for_checkpointing(gaf_step)
    for xb, yb in zip(x.split(MICRO), y.split(MICRO), strict=True):
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(xb), yb))
            gaf_step.after_backward()
            optimizer.step()
            optimizer.zero_grad()
    assert gaf_step.stats.steps == 8 and gaf_step.stats.skipped_steps > 0
    accelerator.save_state(str(tmp_path / "state"))
    saved = gaf_step.stats.state_dict()
    gaf_step.load_state_dict({"collector": {**gaf_step.collector.state_dict(),
                                            "stats": gaf.FilterStats().state_dict()}})
    assert gaf_step.stats.steps == 0
    accelerator.load_state(str(tmp_path / "state"))
    assert gaf_step.stats.state_dict() == saved
