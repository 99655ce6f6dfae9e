"""GAFCallback in real Lightning runs ends where GAFTrainer ends over the same micro-batches."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import gaf
from gaf.integrations.lightning import GAFCallback

from .tiny import (
    assert_same_tensors,
    check_two_rank_run,
    make_data,
    make_net,
    optimizer_state_tensors,
    reference_run,
)

MICRO, M, TAU = 4, 2, 0.9


class Module(pl.LightningModule):
    def __init__(self, net, make_optimizer, make_scheduler=None):
        super().__init__()
        self.net = net
        self.make_optimizer = make_optimizer
        self.make_scheduler = make_scheduler

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        optimizer = self.make_optimizer(self.net.parameters())
        if self.make_scheduler is None:
            return optimizer
        scheduler = self.make_scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler,
                                                         "interval": "step"}}


def fit(module, x, y, callback, tmp_path, ckpt_path=None, **trainer_kwargs):
    settings = dict(
        accelerator="cpu", devices=1, max_epochs=1, accumulate_grad_batches=M,
        callbacks=[callback], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, logger=False, num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer = pl.Trainer(**{**settings, **trainer_kwargs})
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=MICRO, shuffle=False),
                ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize(
    "make_optimizer",
    [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
     lambda p: torch.optim.Adam(p, lr=0.01)],
    ids=["sgd_momentum", "adam"],
)
def test_lightning_matches_gaftrainer_bitwise_with_clipping(make_optimizer, tmp_path):
    x, y = make_data(64)
    module = Module(make_net(), make_optimizer)
    callback = GAFCallback(tau=TAU)
    trainer = fit(module, x, y, callback, tmp_path, gradient_clip_val=0.5)

    net = make_net()
    optimizer = make_optimizer(net.parameters())
    ref = reference_run(net, optimizer, x, y, micro_batch=MICRO, num_micro_batches=M, tau=TAU,
                        max_grad_norm=0.5)
    assert 0 < ref.stats.skipped_steps < ref.stats.steps  # skipped and taken steps both occur
    assert callback.stats == ref.stats
    assert_same_tensors(module.net.parameters(), net.parameters(), "parameters")
    # Skipped steps never reached the optimizer: its state (momentum, Adam's step) agrees.
    assert_same_tensors(optimizer_state_tensors(trainer.optimizers[0]),
                        optimizer_state_tensors(optimizer), "optimizer state")
    logged = trainer.callback_metrics
    assert float(logged["gaf/skipped_epoch"]) == pytest.approx(ref.stats.skip_rate)
    assert float(logged["gaf/acceptance_epoch"]) == pytest.approx(ref.stats.acceptance_rate)


def test_lightning_holds_step_schedulers_on_skipped_steps(tmp_path):
    x, y = make_data(64)

    def make_optimizer(p):
        return torch.optim.SGD(p, lr=0.1)

    def make_scheduler(o):
        return torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)

    module = Module(make_net(), make_optimizer, make_scheduler)
    trainer = fit(module, x, y, GAFCallback(tau=TAU), tmp_path)

    net = make_net()
    optimizer = make_optimizer(net.parameters())
    scheduler = make_scheduler(optimizer)
    ref = reference_run(net, optimizer, x, y, micro_batch=MICRO, num_micro_batches=M, tau=TAU,
                        scheduler=scheduler)
    assert ref.stats.skipped_steps > 0
    lightning_scheduler = trainer.lr_scheduler_configs[0].scheduler
    taken = ref.stats.steps - ref.stats.skipped_steps
    assert lightning_scheduler.last_epoch == scheduler.last_epoch == taken
    assert trainer.optimizers[0].param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert_same_tensors(module.net.parameters(), net.parameters(), "parameters")
    # The callback puts the scheduler's own step back when fitting ends.
    assert "step" not in vars(lightning_scheduler)


def test_lightning_bf16_mixed_matches_gaftrainer_autocast(tmp_path):
    x, y = make_data(64)

    def make_optimizer(p):
        return torch.optim.Adam(p, lr=0.01)

    module = Module(make_net(), make_optimizer)
    callback = GAFCallback(tau=TAU)
    fit(module, x, y, callback, tmp_path, precision="bf16-mixed")

    net = make_net()
    ref = reference_run(net, make_optimizer(net.parameters()), x, y, micro_batch=MICRO,
                        num_micro_batches=M, tau=TAU, autocast_dtype=torch.bfloat16)
    assert ref.stats.skipped_steps > 0
    assert callback.stats == ref.stats
    assert_same_tensors(module.net.parameters(), net.parameters(), "parameters")


def test_lightning_16_mixed_grad_scaler_matches_gaftrainer_with_overflows(tmp_path):
    # Lightning's "16-mixed" falls back to bf16 on the CPU; the plugin given by hand keeps
    # float16 autocast and a real GradScaler. The initial scale is large enough that the
    # first steps overflow, so the overflow path (scaler skips and backs off) runs too.
    from lightning.pytorch.plugins.precision import MixedPrecision

    x, y = make_data(96)

    def make_optimizer(p):
        return torch.optim.SGD(p, lr=0.1, momentum=0.9)

    def make_scaler(init_scale):
        return torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=3)

    # Lightning scales loss / M: its scale S meets the same float16 range as GAFTrainer's
    # S / M on the undivided loss (and the overflows fall on the same steps).
    plugin = MixedPrecision("16-mixed", "cpu", scaler=make_scaler(2.0**19))
    module = Module(make_net(), make_optimizer)
    callback = GAFCallback(tau=TAU)
    fit(module, x, y, callback, tmp_path, plugins=[plugin], gradient_clip_val=0.5)

    net = make_net()
    ref = reference_run(net, make_optimizer(net.parameters()), x, y, micro_batch=MICRO,
                        num_micro_batches=M, tau=TAU, autocast_dtype=torch.float16,
                        scaler=make_scaler(2.0**19 / M), max_grad_norm=0.5)
    assert ref.overflow_steps > 0 and ref.stats.skipped_steps > ref.overflow_steps
    assert callback.overflow_steps == ref.overflow_steps
    assert callback.stats == ref.stats
    lightning_state, ref_state = plugin.scaler.state_dict(), ref.scaler.state_dict()
    assert lightning_state.pop("scale") == M * ref_state.pop("scale")
    assert lightning_state == ref_state  # growth tracker: skipped steps left it alone
    assert_same_tensors(module.net.parameters(), net.parameters(), "parameters")


def test_lightning_ddp_two_processes_matches_distributed_gaftrainer(tmp_path):
    check_two_rank_run("lightning", tmp_path, micro_batches_per_rank=M)


class ManualModule(pl.LightningModule):
    """The manual-optimisation recipe of gaf.integrations.lightning's docstring."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.automatic_optimization = False

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def on_fit_start(self):
        self.collector = gaf.GradientCollector(self.optimizers().optimizer.param_groups,
                                               tau=TAU)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        for x, y in zip(*(t.chunk(M) for t in batch), strict=True):
            self.manual_backward(F.cross_entropy(self.net(x), y))
            self.collector.collect()
        result = self.collector.finish()
        if not result.skipped:
            self.clip_gradients(opt, gradient_clip_val=0.5)
            opt.step()
        opt.zero_grad()


def test_lightning_manual_optimisation_recipe_matches_gaftrainer(tmp_path):
    x, y = make_data(64)
    module = ManualModule(make_net())
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=MICRO * M, shuffle=False))

    net = make_net()
    ref = reference_run(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), x, y,
                        micro_batch=MICRO, num_micro_batches=M, tau=TAU, max_grad_norm=0.5)
    assert 0 < ref.stats.skipped_steps < ref.stats.steps
    assert module.collector.stats == ref.stats
    assert_same_tensors(module.net.parameters(), net.parameters(), "parameters")


def test_lightning_refuses_a_single_micro_batch_and_manual_optimisation(tmp_path):
    x, y = make_data(16)
    loader = DataLoader(TensorDataset(x, y), batch_size=MICRO)

    def trainer():
        return pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                          callbacks=[GAFCallback()], enable_progress_bar=False,
                          enable_model_summary=False, enable_checkpointing=False,
                          default_root_dir=tmp_path)

    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        trainer().fit(Module(make_net(), lambda p: torch.optim.SGD(p, lr=0.1)), loader)
    with pytest.raises(ValueError, match="manual optimisation"):
        trainer().fit(ManualModule(make_net()), loader)


def test_lightning_checkpoint_carries_the_gaf_state(tmp_path):
    # An adaptive threshold has state of its own: a resumed run must pick it up too.
    x, y = make_data(32)

    def run(epochs, ckpt_path=None):
        module = Module(make_net(), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
        callback = GAFCallback(tau=gaf.MovingAverageThreshold(k=0.5, window=8, initial=0.9))
        trainer = fit(module, x, y, callback, tmp_path, ckpt_path=ckpt_path, max_epochs=epochs)
        return module, callback, trainer

    whole_module, whole, _ = run(2)
    _, first, first_trainer = run(1)
    first_trainer.save_checkpoint(tmp_path / "one-epoch.ckpt")
    resumed_module, resumed, _ = run(2, ckpt_path=tmp_path / "one-epoch.ckpt")
    assert 0 < whole.stats.skipped_steps < whole.stats.steps
    assert resumed.stats == whole.stats and resumed.stats.steps == 2 * first.stats.steps
    assert resumed.collector.threshold.state_dict() == whole.collector.threshold.state_dict()
    assert_same_tensors(resumed_module.net.parameters(), whole_module.net.parameters(),
                        "parameters")


class SkippingModule(Module):
    """Returns None (Lightning: no backward) for the batches in ``skip``."""

    def __init__(self, net, make_optimizer, skip):
        super().__init__(net, make_optimizer)
        self.skip = skip

    def training_step(self, batch, batch_idx):
        return None if batch_idx in self.skip else super().training_step(batch, batch_idx)


def test_lightning_window_whose_last_batch_runs_no_backward(tmp_path):
    # Batch 3 closes the second window without a backward: that window holds one
    # micro-gradient, which cannot agree with another, so it is skipped and nothing of it
    # reaches the next window.
    x, y = make_data(64)

    def make_optimizer(p):
        return torch.optim.SGD(p, lr=0.1, momentum=0.9)

    module = SkippingModule(make_net(), make_optimizer, skip={3})
    callback = GAFCallback(tau=TAU)
    fit(module, x, y, callback, tmp_path)
    assert callback.stats.steps == 8 and callback.stats.micro_batches == 15

    net = make_net()
    keep = torch.cat([torch.arange(0, 8), torch.arange(16, 64)])  # without the second window
    ref = reference_run(net, make_optimizer(net.parameters()), x[keep], y[keep],
                        micro_batch=MICRO, num_micro_batches=M, tau=TAU)
    assert callback.stats.skipped_steps == ref.stats.skipped_steps + 1
    assert_same_tensors(module.net.parameters(), net.parameters(), "parameters")
