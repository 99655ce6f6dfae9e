"""The collector feeds each step's Gram matrix to its gaf.NoiseScale; loggers report it."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

import gaf
from gaf.integrations.common import step_statistics


def _trainer(mode: str = "stacked", micro_gradients: str = "sequential", m: int = 3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kwargs = {} if micro_gradients == "one-pass" else {"mode": mode}
    return gaf.GAFTrainer(model, opt, F.cross_entropy, num_micro_batches=m, tau=2.0,
                          micro_gradients=micro_gradients, **kwargs)


@pytest.mark.parametrize("micro_gradients", ["sequential", "one-pass"])
def test_trainer_feeds_the_noise_scale_with_the_real_micro_batch_sizes(micro_gradients):
    trainer = _trainer(micro_gradients=micro_gradients)
    mirror = gaf.NoiseScale()
    for step in range(6):
        torch.manual_seed(100 + step)
        x, y = torch.randn(10, 12), torch.randint(0, 4, (10,))  # 10 = 4 + 3 + 3
        result = trainer.step(x, y).result
        mirror.update(result.extra["gram"], [4, 3, 3])
        assert result.extra["b_simple"] == mirror.b_simple
    b = trainer.collector.noise_scale.b_simple
    assert b is not None and math.isfinite(b) and b > 0
    assert trainer.collector.noise_scale.state_dict() == mirror.state_dict()


def test_streaming_builds_no_gram_and_reports_no_noise_scale():
    trainer = _trainer(mode="streaming", m=2)
    result = trainer.step(torch.randn(8, 12), torch.randint(0, 4, (8,))).result
    assert "b_simple" not in result.extra
    assert trainer.collector.noise_scale.b_simple is None
    assert "b_simple" not in step_statistics(result)


def test_collect_takes_sizes_and_the_state_round_trips():
    torch.manual_seed(1)
    model = torch.nn.Linear(6, 3)
    collector = gaf.GradientCollector(model.parameters(), tau=2.0, mode="stacked")
    for _ in range(3):
        for size in (5, 7):
            x, y = torch.randn(size, 6), torch.randint(0, 3, (size,))
            F.cross_entropy(model(x), y).backward()
            collector.collect(size=size)
        result = collector.finish()
        model.zero_grad(set_to_none=True)
    row = step_statistics(result, collector.stats)
    assert row["b_simple"] == collector.noise_scale.b_simple > 0
    fresh = gaf.GradientCollector(model.parameters(), tau=2.0, mode="stacked")
    fresh.load_state_dict(collector.state_dict())
    assert fresh.noise_scale.b_simple == collector.noise_scale.b_simple


def test_rows_of_unknown_size_leave_the_noise_scale_alone():
    model = torch.nn.Linear(6, 3)
    collector = gaf.GradientCollector(model.parameters(), tau=2.0, mode="stacked")
    for _ in range(2):
        F.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
        collector.collect()                      # no size, no micro_batch_size
    assert "b_simple" not in collector.finish().extra
    assert collector.noise_scale.b_simple is None


def test_the_gram_in_the_result_is_the_host_copy_the_decision_read():
    grads = torch.randn(4, 50)
    result = gaf.filter_gradients(grads, tau=2.0)
    gram = result.extra["gram"]
    assert gram.device.type == "cpu" and gram.dtype == torch.float64
    torch.testing.assert_close(gram, (grads.double() @ grads.double().T), rtol=1e-5, atol=1e-5)
