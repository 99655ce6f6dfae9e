"""Cases where gaf used to do the wrong thing quietly, or fail late (issue 19: cases 2, 4,
5 and 11): each now fails at once with a message that names the problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

import gaf


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def batch(seed: int = 0, n: int = 12):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)


# -- case 2: an optimizer over another model --------------------------------------------------


def test_optimizer_over_another_model_is_refused_at_construction():
    model, _ = setup()
    other, _ = setup(1)
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    for micro_gradients in ("sequential", "one-pass"):
        with pytest.raises(ValueError, match="none of the model's"):
            gaf.GAFTrainer(model, optimizer, F.cross_entropy, 2, tau=2.0,
                           micro_gradients=micro_gradients)
    with pytest.raises(ValueError, match="none of the model's"):
        gaf.GAFTrainer(model, optimizer, F.cross_entropy, 2, mode="average")
    # An optimizer over some of the model's parameters (a frozen part) is fine.
    partial = torch.optim.SGD(model[2].parameters(), lr=0.1)
    assert not gaf.GAFTrainer(model, partial, F.cross_entropy, 2, tau=2.0).step(
        *batch()).skipped


# -- case 4: load_state_dict ----------------------------------------------------------------


def trained(tau=0.9, **kwargs):
    model, opt = setup()
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, 3, tau=tau, **kwargs)
    for step in range(3):
        trainer.step(*batch(step))
    return model, opt, trainer


def test_a_checkpoint_never_replaces_the_constructors_fixed_tau():
    model, opt, trainer = trained(tau=2.0)
    strict = gaf.GAFTrainer(model, opt, F.cross_entropy, 3, tau=0.0)
    with pytest.raises(ValueError, match=r"saved with tau 2\.0.*built with tau 0\.0"):
        strict.load_state_dict(trainer.state_dict())
    assert strict.collector.tau == 0.0 and strict.stats.steps == 0  # nothing changed
    same = gaf.GAFTrainer(model, opt, F.cross_entropy, 3, tau=2.0)
    same.load_state_dict(trainer.state_dict())
    assert same.stats == trainer.stats


def test_adaptive_thresholds_still_resume_their_history():
    make = lambda: gaf.QuantileThreshold(0.5, window=20, min_samples=2)  # noqa: E731
    model, opt, trainer = trained(tau=make(), mode="stacked")
    resumed = gaf.GAFTrainer(model, opt, F.cross_entropy, 3, tau=make(), mode="stacked")
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.collector.tau == trainer.collector.tau
    assert resumed.collector.threshold.state_dict() == trainer.collector.threshold.state_dict()


def test_a_threshold_of_another_kind_is_named_not_a_key_error():
    model, opt, adaptive = trained(tau=gaf.MovingAverageThreshold(window=10), mode="stacked")
    fixed = gaf.GAFTrainer(model, opt, F.cross_entropy, 3, tau=0.9, mode="stacked")
    with pytest.raises(ValueError, match="'moving-average' threshold, not 'fixed'"):
        fixed.load_state_dict(adaptive.state_dict())
    _, _, plain = trained(tau=0.9, mode="stacked")
    moving = gaf.GAFTrainer(model, opt, F.cross_entropy, 3, mode="stacked",
                            tau=gaf.MovingAverageThreshold(window=10))
    with pytest.raises(ValueError, match="'fixed' threshold, not 'moving-average'"):
        moving.load_state_dict(plain.state_dict())


def test_a_foreign_dict_is_named_not_a_key_error():
    _, _, trainer = trained()
    with pytest.raises(ValueError, match="not a GAFTrainer state_dict.*'collector'"):
        trainer.load_state_dict({"model": {}, "optimizer": {}})
    with pytest.raises(ValueError, match="not a GradientCollector state_dict"):
        trainer.collector.load_state_dict({"weights": 1})
    with pytest.raises(ValueError, match="not a GradientCollector state_dict"):
        trainer.collector.load_state_dict([1, 2])


def test_a_streaming_checkpoint_is_refused_by_a_stacked_trainer():
    model, opt, streaming = trained(tau=0.9, mode="streaming")
    stacked = gaf.GAFTrainer(model, opt, F.cross_entropy, 3, tau=0.9, mode="stacked")
    with pytest.raises(ValueError, match="mode 'streaming'.*mode 'stacked'"):
        stacked.load_state_dict(streaming.state_dict())
    assert stacked.stats.steps == 0


# -- case 5: collect() twice without a backward ---------------------------------------------------


@pytest.mark.parametrize("mode", ["streaming", "stacked"])
def test_collect_without_a_backward_in_between_is_an_error(mode):
    model, _ = setup()
    collector = gaf.GradientCollector(model.parameters(), tau=2.0, mode=mode)
    x, y = batch()
    collector.begin()
    with pytest.raises(RuntimeError, match="no new gradient.*since the last begin"):
        collector.collect()
    F.cross_entropy(model(x[:6]), y[:6]).backward()
    collector.collect()
    with pytest.raises(RuntimeError, match="no new gradient.*since the last collect"):
        collector.collect()  # on main: an all-zero row, counted invalid, step skipped
    assert collector.num_collected == 1
    F.cross_entropy(model(x[6:]), y[6:]).backward()
    collector.collect()
    result = collector.finish()
    assert not result.skipped and result.num_invalid == 0


def test_collect_still_takes_gradients_written_by_hand():
    # Without begin(), and with .grad replaced by hand, there is something new to take.
    model, _ = setup()
    collector = gaf.GradientCollector(model.parameters(), tau=2.0)
    for value in (1.0, 2.0):
        for p in model.parameters():
            p.grad = torch.full_like(p, value)
        collector.collect()
    assert collector.finish().num_accepted == 2


# -- case 11: rule_options of the wrong type; a stack that requires grad -------------------


def test_rule_options_of_the_wrong_type_names_rule_options():
    model, opt = setup()
    with pytest.raises(TypeError, match="rule_options must be a mapping"):
        gaf.GAFTrainer(model, opt, F.cross_entropy, 4, rule="multi-krum", rule_options=1)
    with pytest.raises(TypeError, match="rule_options must be a mapping"):
        gaf.filter_gradients(torch.randn(4, 3), rule="multi-krum", rule_options=1)


def test_filter_gradients_takes_a_stack_that_requires_grad():
    leaf = torch.randn(4, 10, requires_grad=True)
    grads = leaf * 2  # an autograd output
    result = gaf.filter_gradients(grads, tau=2.0)
    assert result.num_accepted == 4 and not result.grad.requires_grad
    torch.testing.assert_close(result.grad, (leaf * 2).detach().mean(0))
    assert gaf.filter_gradients(leaf, tau=2.0).num_accepted == 4
