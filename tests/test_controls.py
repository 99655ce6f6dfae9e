"""Blind controls: the same step as GAF with the choice made by a seeded coin."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

import gaf
from gaf.controls import RandomDrop, RandomSkip

CASES = [
    ("mean", "streaming"),
    ("halving", "streaming"),
    ("mean", "stacked"),
    ("halving", "stacked"),
    ("anchor", "stacked"),
    ("neighbours", "stacked"),
    ("consensus", "stacked"),
]


def model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)


def batches(steps, seed=1, n=32):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 4, generator=gen)
    for _ in range(steps):
        x = torch.randn(n, 12, generator=gen)
        y = (x @ w).argmax(1)
        flip = torch.rand(n, generator=gen) < 0.4
        yield x, torch.where(flip, torch.randint(0, 4, (n,), generator=gen), y)


def run(steps, m=4, device_side=None, **kwargs):
    model, opt = model_and_opt()
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, m, max_grad_norm=5.0, **kwargs)
    if device_side is not None:
        trainer.collector.device_side = device_side
    outs = [trainer.step(x, y) for x, y in batches(steps)]
    return model, outs


def same_bits(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("rule, mode", CASES)
def test_accept_everything_is_gaf_at_tau_two_bit_for_bit(rule, mode):
    sides = (False, True) if mode == "streaming" else (None,)
    for side in sides:  # streaming: the host path and the device path (torch.where)
        ref, ref_out = run(20, rule=rule, mode=mode, tau=2.0, device_side=side)
        for control in (RandomSkip(0.0, seed=3), RandomDrop(0.0, seed=4)):
            got, outs = run(20, rule=rule, mode=mode, tau=0.5, control=control,
                            device_side=side)
            assert same_bits(ref, got), (rule, mode, control)
            for a, b in zip(ref_out, outs, strict=True):
                assert a.result.accepted.tolist() == b.result.accepted.tolist()
                # Distances are still measured and reported.
                assert torch.equal(a.result.distances, b.result.distances)


@pytest.mark.parametrize("rule, mode", CASES)
def test_reject_everything_skips_every_step_like_tau_zero(rule, mode):
    model0 = model_and_opt()[0]
    _, at_zero = run(10, rule=rule, mode=mode, tau=0.0)
    assert all(o.skipped for o in at_zero)
    for control in (RandomSkip(1.0), RandomDrop(1.0)):
        model, outs = run(10, rule=rule, mode=mode, tau=2.0, control=control)
        assert all(o.skipped for o in outs)
        for a, b in zip(at_zero, outs, strict=True):
            assert a.result.accepted.tolist() == b.result.accepted.tolist()
        assert same_bits(model0, model)  # nothing moved


def test_skip_rate_within_binomial_spread():
    steps, p = 600, 0.3
    for mode in ("streaming", "stacked"):
        control = RandomSkip(p, seed=11)
        model, opt = model_and_opt()
        collector = gaf.GradientCollector(model.parameters(), tau=0.1, mode=mode,
                                          num_micro_batches=2, control=control)
        x, y = next(batches(1))
        for _ in range(steps):
            for xs, ys in zip(x.tensor_split(2), y.tensor_split(2), strict=True):
                F.cross_entropy(model(xs), ys).backward()
                collector.collect()
            collector.finish()
        spread = math.sqrt(p * (1 - p) / steps)
        assert abs(collector.stats.skip_rate - p) < 4 * spread, collector.stats.skip_rate


def test_drop_rate_within_binomial_spread():
    steps, q, m = 300, 0.4, 4
    control = RandomDrop(q, seed=5)
    model, opt = model_and_opt()
    collector = gaf.GradientCollector(model.parameters(), tau=0.0, mode="stacked",
                                      control=control)
    x, y = next(batches(1))
    kept = tested = skipped = 0
    for _ in range(steps):
        for xs, ys in zip(x.tensor_split(m), y.tensor_split(m), strict=True):
            F.cross_entropy(model(xs), ys).backward()
            collector.collect()
        r = collector.finish()
        kept += r.num_accepted - 1  # the anchor is always kept
        tested += m - 1
        skipped += r.skipped
    spread = math.sqrt(q * (1 - q) / tested)
    assert abs(1 - kept / tested - q) < 4 * spread
    # A step is skipped when all three non-anchor rows are dropped: probability q³.
    assert abs(skipped / steps - q**3) < 4 * math.sqrt(q**3 * (1 - q**3) / steps)


@pytest.mark.parametrize("cls", [RandomSkip, RandomDrop])
def test_state_dict_round_trip_reproduces_draws(cls):
    a = cls(0.5, seed=7)
    for _ in range(13):
        a.draw(4)
    state = a.state_dict()
    ahead = [a.draw(4).tolist() for _ in range(20)]
    b = cls(0.1, seed=99)
    b.load_state_dict(state)
    assert [b.draw(4).tolist() for _ in range(20)] == ahead
    assert b.seed == 7 and (b.p if cls is RandomSkip else b.q) == 0.5


def test_trainer_state_dict_carries_the_control():
    model, opt = model_and_opt()
    control = RandomDrop(0.5, seed=2)
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, 4, control=control)
    for x, y in batches(3):
        trainer.step(x, y)
    state = trainer.state_dict()
    expected = [control.draw(4).tolist() for _ in range(5)]
    fresh = RandomDrop(0.9, seed=0)
    resumed = gaf.GAFTrainer(model, opt, F.cross_entropy, 4, control=fresh)
    resumed.load_state_dict(state)
    assert fresh.q == 0.5
    assert [fresh.draw(4).tolist() for _ in range(5)] == expected


def test_rate_is_settable_and_checked():
    c = RandomSkip(0.2)
    c.p = 0.9
    assert c.p == 0.9
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        c.p = 1.5
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        RandomDrop(-0.1)
    with pytest.raises(TypeError, match="probability"):
        RandomDrop("0.5")
    with pytest.raises(ValueError, match="num_rows"):
        c.draw(0)
    d = RandomDrop(0.0)
    d.q = 1.0
    assert not d.draw(5).any()


def test_streaming_control_needs_the_number_of_micro_batches():
    model, _ = model_and_opt()
    with pytest.raises(ValueError, match="num_micro_batches"):
        gaf.GradientCollector(model.parameters(), mode="streaming", control=RandomSkip(0.5))
    with pytest.raises(TypeError, match="draw"):
        gaf.GradientCollector(model.parameters(), control=object())


def test_verdicts_are_drawn_at_the_first_micro_batch():
    # The rate in force when the step starts decides it: changing p mid-step has no effect.
    model, _ = model_and_opt()
    control = RandomSkip(1.0)
    collector = gaf.GradientCollector(model.parameters(), tau=2.0, num_micro_batches=2,
                                      control=control)
    x, y = next(batches(1))
    for k, (xs, ys) in enumerate(zip(x.tensor_split(2), y.tensor_split(2), strict=True)):
        F.cross_entropy(model(xs), ys).backward()
        collector.collect()
        if k == 0:
            control.p = 0.0
    assert collector.finish().skipped


def test_wrong_number_of_rows_is_named():
    model, _ = model_and_opt()
    collector = gaf.GradientCollector(model.parameters(), num_micro_batches=3,
                                      control=RandomSkip(0.0))
    x, y = next(batches(1))
    for xs, ys in zip(x.tensor_split(2), y.tensor_split(2), strict=True):
        F.cross_entropy(model(xs), ys).backward()
        collector.collect()
    with pytest.raises(ValueError, match="verdicts for 3 rows"):
        collector.finish()


def test_invalid_rows_are_never_accepted_by_a_control():
    x = torch.tensor([[1.0, 0.0], [float("nan"), 1.0], [0.0, 0.0], [0.0, 1.0]])
    for rule in gaf.RULES:
        r = gaf.filter_gradients(x, 0.0, rule, verdicts=np.ones(4, dtype=bool))
        assert r.accepted.tolist() == [True, False, False, True], rule
    with pytest.raises(ValueError, match="one entry per row"):
        gaf.filter_gradients(x, 0.5, verdicts=np.ones(3, dtype=bool))
