"""Thresholds: schedules, adaptive rules, state round trips, determinism, bad input."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from gaf.collector import GradientCollector
from gaf.core import FilterResult
from gaf.core.filter import filter_gradients
from gaf.thresholds import (
    THRESHOLDS,
    FixedThreshold,
    MovingAverageThreshold,
    NullTailThreshold,
    QuantileThreshold,
    ScheduledThreshold,
    StepThreshold,
    Threshold,
    as_threshold,
    make_threshold,
    parse_threshold,
)
from gaf.thresholds import (
    tested_distances as observed_distances,
)


def fake(distances, valid=None, anchor=0, tau=1.0):
    """A FilterResult carrying the given per-row distances (row ``anchor`` is the anchor)."""
    d = torch.tensor(distances, dtype=torch.float64)
    return FilterResult(
        grad=torch.zeros(1), accepted=d <= tau, distances=d, weights=torch.zeros_like(d),
        anchor=anchor, num_invalid=0, tau=tau, rule="mean",
        valid=None if valid is None else torch.tensor(valid),
    )


def feed(threshold, values):
    """One M = 2 step per value: the anchor at 0, the tested row at ``value``."""
    for v in values:
        threshold.observe(fake([0.0, v]))


def real_results(n, seed=0, m=3, p=64):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(p, generator=g)
    out = []
    for i in range(n):
        x = 0.2 * shared + torch.randn(m, p, generator=g)
        out.append(filter_gradients(x, [0.9, 1.0, 2.0][i % 3]))
    return out


ADAPTIVE = [
    lambda: MovingAverageThreshold(k=1.0, window=30, min_samples=5),
    lambda: QuantileThreshold(0.7, window=30, min_samples=5),
    lambda: NullTailThreshold(z=1.0, window=30, min_samples=3),
]
ALL = [
    lambda: FixedThreshold(0.9),
    lambda: ScheduledThreshold(2.0, 0.9, 40, "linear"),
    lambda: ScheduledThreshold(2.0, 0.9, 40, "cosine"),
    lambda: StepThreshold([2.0, 1.0, 0.95], [10, 25]),
    *ADAPTIVE,
]


# -- what thresholds observe -------------------------------------------------------------------


def test_tested_distances_skip_anchor_and_invalid_rows():
    r = fake([0.7, 0.0, 2.0, 2.0, 0.4], valid=[True, True, False, True, True], anchor=1)
    assert observed_distances(r).tolist() == [0.7, 2.0, 0.4]  # a valid 2.0 counts
    r.valid = None  # without the mask a reported 2 means "invalid"
    assert observed_distances(r).tolist() == [0.7, 0.4]
    assert observed_distances(fake([2.0, 2.0], anchor=-1)).tolist() == []


def test_filter_results_record_valid_rows():
    x = torch.randn(3, 5)
    x[1] = 0
    assert filter_gradients(x, 2.0).valid.tolist() == [True, False, True]


# -- schedules ------------------------------------------------------------------------------


def test_linear_and_cosine_schedules():
    lin = ScheduledThreshold(2.0, 1.0, 10, "linear")
    cos = ScheduledThreshold(2.0, 1.0, 10, "cosine")
    assert lin.value() == cos.value() == 2.0
    feed(lin, [0.5] * 5)
    feed(cos, [0.5] * 5)
    assert lin.value() == pytest.approx(1.5)
    assert cos.value() == pytest.approx(1.5)  # cosine passes the midpoint at half-way
    feed(lin, [0.5] * 2)
    feed(cos, [0.5] * 2)
    assert lin.value() == pytest.approx(1.3)
    assert cos.value() == pytest.approx(1.0 + 0.5 * (1 + math.cos(0.7 * math.pi)))
    feed(lin, [0.5] * 20)
    assert lin.value() == 1.0 and lin.value() == 1.0  # stays at end; value() is pure


def test_step_schedule():
    s = StepThreshold([2.0, 0.97, 0.9], [3, 5])
    seen = []
    for _ in range(7):
        seen.append(s.value())
        feed(s, [0.5])
    assert seen == [2.0, 2.0, 2.0, 0.97, 0.97, 0.9, 0.9]


# -- adaptive rules ---------------------------------------------------------------------------


def test_moving_average_is_mean_plus_k_std_capped():
    th = MovingAverageThreshold(k=2.0, window=4, tau_max=1.5, min_samples=3, initial=0.8)
    feed(th, [0.9, 0.7])
    assert th.value() == 0.8  # fewer than min_samples: the initial value
    feed(th, [0.8])
    d = np.array([0.9, 0.7, 0.8])
    assert th.value() == pytest.approx(d.mean() + 2 * d.std())
    feed(th, [1.0, 1.2])  # the window keeps the last 4
    d = np.array([0.7, 0.8, 1.0, 1.2])
    assert th.value() == pytest.approx(d.mean() + 2 * d.std())
    feed(th, [1.9, 1.9, 1.9])
    assert th.value() == 1.5  # capped at tau_max


def test_quantile_rule_hits_its_acceptance_target():
    th = QuantileThreshold(0.8, window=400, min_samples=50)
    rng = np.random.default_rng(0)
    accepted = 0
    steps = 3000
    for _ in range(steps):
        d = float(rng.normal(0.9, 0.05))  # a stationary stream of distances
        accepted += d <= th.value()
        feed(th, [d])
    assert accepted / steps == pytest.approx(0.8, abs=0.03)
    window = np.array(th.distances)
    assert th.value() == pytest.approx(float(np.quantile(window, 0.8)))


def test_null_tail_estimates_chance_spread():
    # Tail distances 1.1 and 1.2 (and values <= 1 that must be ignored):
    # sigma = sqrt((0.1² + 0.2²) / 2).
    th = NullTailThreshold(z=2.0, window=10, min_samples=2)
    feed(th, [0.3, 1.1, 0.99])
    assert th.value() == 1.0  # one tail value: not enough yet
    feed(th, [1.2])
    assert th.value() == pytest.approx(1 - 2 * math.sqrt((0.01 + 0.04) / 2))


def test_null_tail_on_pure_noise_gradients():
    # Independent Gaussian micro-gradients share no direction: cos ~ N(0, 1/P), so the rule
    # should find sigma ≈ 1/sqrt(P) and accept about 16% of them at z = 1.
    p = 400
    th = NullTailThreshold(z=1.0, window=2000, min_samples=20)
    g = torch.Generator().manual_seed(1)
    accepted = 0
    for _ in range(3000):
        r = filter_gradients(torch.randn(2, p, generator=g, dtype=torch.float64), th.value())
        accepted += not r.skipped
        th.observe(r)
    assert 1 - th.value() == pytest.approx(1 / math.sqrt(p), rel=0.1)
    assert accepted / 3000 == pytest.approx(0.16, abs=0.04)


def test_adaptive_threshold_in_a_collector():
    torch.manual_seed(0)
    model = nn.Linear(10, 3)
    th = QuantileThreshold(0.5, window=20, min_samples=5)
    col = GradientCollector(model.parameters(), tau=th)
    taus = []
    for _ in range(15):
        for _ in range(2):
            x, y = torch.randn(4, 10), torch.randint(0, 3, (4,))
            nn.functional.cross_entropy(model(x), y).backward()
            col.collect()
        res = col.finish()
        taus.append(res.tau)
    assert th.steps == col.stats.steps == 15
    assert len(th.distances) == 15
    assert taus[0] == 1.0 and len(set(taus[5:])) > 1  # initial, then it adapts
    clone = GradientCollector(model.parameters(), tau=QuantileThreshold(0.5, window=20,
                                                                         min_samples=5))
    clone.load_state_dict(copy.deepcopy(col.state_dict()))
    assert clone.tau == col.tau and clone.stats.steps == 15
    # The clone's next step tests the restored tau, not the one it was built with.
    restored = col.tau
    assert restored != 1.0  # the tau the clone was built with
    x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
    for c in (col, clone):
        for k in range(2):
            xs, ys = x[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4]
            nn.functional.cross_entropy(model(xs), ys).backward()
            c.collect()
    assert clone.finish().tau == col.finish().tau == restored


# -- state and determinism ----------------------------------------------------------------------


@pytest.mark.parametrize("make", ALL)
def test_state_dict_round_trip(make):
    results = real_results(60)
    a = make()
    for r in results[:35]:
        a.observe(r)
    state = json.loads(json.dumps(a.state_dict()))  # plain, serialisable state
    b = make()
    b.load_state_dict(state)
    assert b.value() == a.value()
    for r in results[35:]:
        a.observe(r)
        b.observe(r)
        assert a.value() == b.value()
    assert a.state_dict() == b.state_dict()


@pytest.mark.parametrize("make", ADAPTIVE)
def test_round_trip_restores_hyperparameters(make):
    a = make()
    feed(a, [0.8, 0.9, 1.05, 1.1, 0.95, 1.2])
    b = make_threshold(a.kind)  # defaults differ: load must bring the saved settings
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() and b.value() == a.value()


@pytest.mark.parametrize("make", ALL)
def test_two_instances_fed_the_same_results_agree_exactly(make):
    # What keeps ranks in step: every rank sees the same FilterResults (from the same
    # all-reduced Gram matrix) and must compute the same tau, bit for bit.
    results = real_results(80, seed=5)
    a, b = make(), make()
    values = set()
    for r in results:
        assert a.value() == b.value()
        values.add(a.value())
        a.observe(r)
        b.observe(copy.deepcopy(r))
    assert a.value() == b.value()
    if not isinstance(a, FixedThreshold):
        assert len(values) > 1  # it did change over the run


def test_load_rejects_state_of_another_kind():
    q = QuantileThreshold()
    with pytest.raises(ValueError, match="moving-average"):
        q.load_state_dict(MovingAverageThreshold().state_dict())
    with pytest.raises(ValueError, match="scheduled"):
        StepThreshold([1.0], []).load_state_dict(ScheduledThreshold(1, 1, 1).state_dict())


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0.0, 1.0, 1.5, -0.1, float("nan")])
def test_quantile_outside_open_unit_interval(q):
    with pytest.raises(ValueError, match="target_acceptance|finite"):
        QuantileThreshold(q)


@pytest.mark.parametrize("cls", [MovingAverageThreshold, QuantileThreshold, NullTailThreshold])
def test_bounds_outside_distance_range(cls):
    for bad in (2.5, -0.1, float("inf")):
        with pytest.raises(ValueError, match="tau_max"):
            cls(tau_max=bad)
        with pytest.raises(ValueError, match="tau_min"):
            cls(tau_min=bad)
    with pytest.raises(ValueError, match="exceeds"):
        cls(tau_min=1.0, tau_max=0.5)
    with pytest.raises(ValueError, match="window"):
        cls(window=0)
    with pytest.raises(ValueError, match="min_samples"):
        cls(window=5, min_samples=6)
    with pytest.raises(ValueError, match="initial"):
        cls(initial=3.0)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="k must"):
        MovingAverageThreshold(k="1")
    with pytest.raises(ValueError, match="z must"):
        NullTailThreshold(z=-1)
    with pytest.raises(ValueError, match="schedule"):
        ScheduledThreshold(2, 1, 10, "exponential")
    with pytest.raises(ValueError, match="total_steps"):
        ScheduledThreshold(2, 1, 0)
    with pytest.raises(ValueError, match="start"):
        ScheduledThreshold(2.1, 1, 10)
    with pytest.raises(ValueError, match="one more value"):
        StepThreshold([1.0, 0.9], [5, 10])
    with pytest.raises(ValueError, match="increase"):
        StepThreshold([1.0, 0.9, 0.8], [10, 5])
    with pytest.raises(ValueError, match="unknown threshold"):
        make_threshold("adaptive")
    with pytest.raises(ValueError, match="tau must"):
        parse_threshold("2.5")
    with pytest.raises(ValueError, match="key=value"):
        parse_threshold("quantile:0.8")
    with pytest.raises(ValueError, match="bad options"):
        parse_threshold("quantile:alpha=0.8")
    with pytest.raises(ValueError, match="not a number"):
        parse_threshold("quantile:target_acceptance=high")


def test_parse_and_make():
    assert parse_threshold("0.97").value() == 0.97
    q = parse_threshold("quantile:target-acceptance=0.8,window=100")
    assert isinstance(q, QuantileThreshold) and q.target_acceptance == 0.8 and q.window == 100
    s = parse_threshold("step:values=2/0.97,milestones=500")
    assert s.values == [2.0, 0.97] and s.milestones == [500]
    lin = parse_threshold("linear:start=2,end=0.97,total_steps=100")
    assert isinstance(lin, ScheduledThreshold) and lin.schedule == "linear"
    for name in THRESHOLDS:
        if name in ("fixed", "moving-average", "quantile", "null-tail"):
            assert isinstance(make_threshold(name), Threshold)
    assert isinstance(as_threshold(NullTailThreshold()), NullTailThreshold)
    assert as_threshold(0.5).value() == 0.5


# -- across ranks ----------------------------------------------------------------------------


def _ranks_with_adaptive_thresholds(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    from gaf.distributed import filter_gradients_distributed

    m, p, steps = 2, 97, 40
    makers = [lambda: MovingAverageThreshold(k=1.0, window=16, tau_max=1.5, min_samples=4),
              lambda: QuantileThreshold(0.6, window=16, min_samples=4),
              lambda: NullTailThreshold(z=1.0, window=16, min_samples=2)]
    for make in makers:
        mine, single = make(), make()  # single: a one-process simulation of all ranks
        g = torch.Generator().manual_seed(11)
        shared = torch.randn(p, generator=g, dtype=torch.float64)
        taus = []
        for _ in range(steps):
            # Every rank draws all N·m rows and keeps its own: the simulation sees them all.
            rows = 0.15 * shared + torch.randn(world_size * m, p, generator=g,
                                               dtype=torch.float64)
            tau = mine.value()
            assert tau == single.value() or abs(tau - single.value()) < 1e-12
            res = filter_gradients_distributed(rows[rank * m:(rank + 1) * m], tau, "mean")
            mine.observe(res)
            single.observe(filter_gradients(rows, single.value(), "mean"))
            taus.append(tau)
        assert len(set(taus)) > 1
        # Bitwise agreement across ranks: gather every rank's state and compare exactly.
        states = [None] * world_size
        dist.all_gather_object(states, mine.state_dict())
        assert all(s == states[0] for s in states)
        np.testing.assert_allclose(states[0]["distances"], list(single.distances), atol=1e-12)


@pytest.mark.slow
def test_adaptive_thresholds_stay_in_step_across_ranks(tmp_path):
    import datetime

    import torch.distributed as dist
    import torch.multiprocessing as mp

    def entry(rank, world_size, init):
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=60))
        try:
            _ranks_with_adaptive_thresholds(rank, world_size)
        finally:
            dist.destroy_process_group()

    mp.start_processes(entry, args=(3, f"file://{tmp_path}/store"), nprocs=3,
                       start_method="fork")


@pytest.mark.parametrize("cls", [MovingAverageThreshold, QuantileThreshold, NullTailThreshold])
def test_warmup_accepts_everything_then_hands_over(cls):
    th = cls(window=10, min_samples=2, warmup_steps=3)
    plain = cls(window=10, min_samples=2)
    values = [0.7, 1.2, 0.9, 1.1, 0.8]
    seen = []
    for v in values:
        seen.append(th.value())
        feed(th, [v])
        feed(plain, [v])
    assert seen[:3] == [2.0, 2.0, 2.0]
    assert th.value() == plain.value()  # statistics were gathered during the warm-up
    with pytest.raises(ValueError, match="warmup_steps"):
        cls(warmup_steps=-1)


# -- experiment toolkit options ----------------------------------------------------------------


def test_train_config_threshold_and_measure_reach_the_collector():
    from gaflab.config import TrainConfig
    from gaflab.methods import make_collector as _make_collector

    cfg = TrainConfig(threshold="null-tail:z=1.5", measure="layerwise").validate()
    assert cfg.label == "gaf (null-tail:z=1.5, layerwise)"
    col = _make_collector(list(nn.Linear(3, 2).parameters()), cfg)
    assert isinstance(col.threshold, NullTailThreshold) and col.threshold.z == 1.5
    assert col.measure == "layerwise" and col.mode == "stacked"
    with pytest.raises(ValueError, match="unknown threshold"):
        TrainConfig(threshold="adaptive").validate()
    with pytest.raises(ValueError, match="unknown measure"):
        TrainConfig(measure="l2").validate()
