from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gaflab.batches import epoch_batches
from gaflab.config import TrainConfig, micro_batches_per_step
from gaflab.evaluation import evaluate
from gaflab.prepare import PreparedData, prepare_data
from gaflab.train import augment_batch, train


def tiny(fmnist_dir, **kw) -> TrainConfig:
    base = dict(data_dir=str(fmnist_dir), train_size=None, epochs=1, micro_batch_size=16,
                num_micro_batches=2, lr=0.05, progress=False, threads=1, eval_batch_size=256)
    base.update(kw)
    return TrainConfig(**base)


def test_epoch_batches_random_are_disjoint():
    g = torch.Generator().manual_seed(0)
    b = epoch_batches(torch.arange(100) % 10, 10, 8, 3, False, g)
    assert b.shape == (4, 3, 8)
    assert b.unique().numel() == 96


def test_epoch_batches_class_balanced():
    labels = torch.arange(200) % 10
    labels[:7] = 0  # class sizes differ a little
    g = torch.Generator().manual_seed(0)
    b = epoch_batches(labels, 10, 20, 2, True, g)
    assert b.shape[1:] == (2, 20) and b.shape[0] >= 4
    for step in b:
        for micro in step:
            assert torch.bincount(labels[micro], minlength=10).tolist() == [2] * 10
    assert b.unique().numel() == b.numel()
    with pytest.raises(ValueError, match="multiple of 10 classes"):
        epoch_batches(labels, 10, 15, 2, True, g)


def test_augment_keeps_shape_and_content_when_not_padding():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    y = augment_batch(x, torch.Generator().manual_seed(1), pad=0)
    for i in range(2):
        assert torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(-1))
    z = augment_batch(x, torch.Generator().manual_seed(1), pad=2)
    assert z.shape == x.shape


class _ReadLabel(nn.Module):
    """Predicts the class written in pixel [0, 0, 0] of each image."""

    def forward(self, x):
        return nn.functional.one_hot(x[:, 0, 0, 0].long(), 10).float()


def test_evaluate_counts_memorised_noisy_labels():
    clean = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    noisy = torch.tensor([0, 1, 2, 3, 9, 9, 9, 9])  # last four are noisy
    is_noisy = noisy != clean
    # the "model" predicts: noisy label for samples 4, 5; true label for 6; other for 7
    pred = torch.tensor([0, 1, 2, 8, 9, 9, 6, 1])
    x = torch.zeros(8, 1, 2, 2)
    x[:, 0, 0, 0] = pred.float()
    tx = torch.zeros(4, 1, 2, 2)
    tx[:, 0, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 3.0])
    data = PreparedData(x, noisy, clean, is_noisy, tx, torch.tensor([1, 2, 3, 0]), 10, 1, 2,
                        0.5, "")
    m = evaluate(_ReadLabel(), data, batch_size=3)
    assert m["test_acc"] == pytest.approx(0.75)
    assert m["train_acc_clean"] == pytest.approx(0.75)
    assert m["memorised"] == pytest.approx(0.5)
    assert m["noisy_true"] == pytest.approx(0.25)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="noise rate"):
        TrainConfig(noise_rate=-0.2).validate()
    with pytest.raises(ValueError, match="noise rate"):
        TrainConfig(noise_rate=1.2).validate()
    with pytest.raises(ValueError, match="unknown dataset"):
        TrainConfig(dataset="svhn").validate()
    with pytest.raises(ValueError, match="tau"):
        TrainConfig(tau=2.5).validate()
    with pytest.raises(ValueError, match="at least 2 micro-batches"):
        TrainConfig(num_micro_batches=1).validate()
    with pytest.raises(ValueError, match="divisible by the 10 classes"):
        TrainConfig(class_balanced=True, micro_batch_size=32).validate()
    with pytest.raises(ValueError, match="human noise"):
        TrainConfig(noise="human").validate()
    with pytest.raises(ValueError, match="larger than the batch size"):
        micro_batches_per_step(32, 64)
    with pytest.raises(ValueError, match="not a multiple"):
        micro_batches_per_step(48, 32)
    assert micro_batches_per_step(64, 16) == 4


def test_prepare_is_seeded_and_independent_of_method(fmnist_dir):
    a = prepare_data(tiny(fmnist_dir, train_size=200, seed=5))
    b = prepare_data(tiny(fmnist_dir, train_size=200, seed=5, method="average"))
    c = prepare_data(tiny(fmnist_dir, train_size=200, seed=6))
    assert torch.equal(a.train_y, b.train_y) and torch.equal(a.train_x, b.train_x)
    assert not torch.equal(a.train_y, c.train_y)
    assert a.noise_fraction == pytest.approx(0.4)  # exact on the subset trained on
    assert torch.equal(a.is_noisy, a.train_y != a.clean_y)


def test_gaf_at_tau_two_is_averaging(fmnist_dir):
    """tau = 2 accepts every micro-gradient: the filtered mean must equal plain gradient
    accumulation over the same micro-batches from the same initial weights."""
    cfg = tiny(fmnist_dir, max_steps=4, noise_rate=0.4)
    data = prepare_data(cfg)
    avg = train(cfg.replace(method="average"), data)
    gaf2 = train(cfg.replace(method="gaf", tau=2.0), data)
    assert gaf2.skipped_steps == 0
    for p, q in zip(avg.model.parameters(), gaf2.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert avg.history[0]["train_loss"] == pytest.approx(gaf2.history[0]["train_loss"], rel=1e-4)
    # both record the same distances on the same steps
    assert avg.distance_trace == pytest.approx(gaf2.distance_trace, abs=1e-3)


def test_gaf_with_tau_zero_skips_every_step_and_leaves_weights(fmnist_dir):
    cfg = tiny(fmnist_dir, max_steps=3, method="gaf", tau=0.0)
    torch.manual_seed(0)
    res = train(cfg)
    assert res.steps == 3 and res.skipped_steps == 3 and res.skip_rate == 1.0
    fresh = train(cfg.replace(epochs=1, max_steps=1, tau=0.0))
    for p, q in zip(res.model.parameters(), fresh.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_training_learns_and_records_history(fmnist_dir):
    cfg = tiny(fmnist_dir, epochs=2, noise_rate=0.2, method="gaf", tau=0.99,
               schedule="cosine", warmup_epochs=0.5)
    seen = []
    res = train(cfg, epoch_hook=lambda e, m: seen.append(e))
    assert seen == [0, 1, 2]
    assert len(res.history) == 2 and res.steps == 2 * (320 // 32)
    h = res.history[-1]
    for key in ("test_acc", "train_acc_clean", "memorised", "noisy_true", "skip_rate",
                "distance_mean", "distance_p50", "lr", "train_loss"):
        assert key in h and math.isfinite(h[key]), key
    assert h["test_acc"] > 0.5  # the synthetic classes are easy
    assert 0.0 <= res.skip_rate < 1.0
    assert len(res.distance_trace) == res.steps
    assert all(0.0 <= d <= 2.0 for d in res.distance_trace)
    assert h["lr"] < cfg.lr  # cosine schedule decayed
    d = res.to_dict()
    assert d["summary"]["final_test_acc"] == h["test_acc"]


def test_class_balanced_adamw_and_clipping_run(fmnist_dir):
    cfg = tiny(fmnist_dir, class_balanced=True, micro_batch_size=20, optimizer="adamw",
               lr=1e-3, max_grad_norm=1.0, max_steps=4, method="average")
    res = train(cfg)
    assert res.steps == 4 and math.isfinite(res.history[0]["train_loss"])
