"""Agreement measures: hand-computed distances, the generic rules against the Gram path and
against slow references, and the measure= plumbing through filter, collector and trainer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gaf
from gaf.collector import GradientCollector
from gaf.core import decide, gram_matrix
from gaf.core.filter import filter_gradients
from gaf.core.measures import (
    MEASURES,
    GramOracle,
    LayerwiseOracle,
    SignOracle,
    decide_with,
    layer_gram_matrices,
    layerwise_distance,
    make_oracle,
    sign_distance,
)
from gaf.training import GAFTrainer


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# -- hand-computed distances ----------------------------------------------------------------


def test_sign_distance_counts_matching_signs():
    # Signs match at 3 of 4 coordinates: 1 - (1 - 1 + 1 + 1)/4 = 0.5 = 2 · (1/4 mismatched).
    assert sign_distance(t(1, 2, -3, 4), t(5, -1, -1, 1)) == pytest.approx(0.5)
    a = t(0.3, -2.0, 7.0)
    assert sign_distance(a, a * t(10, 0.1, 3)) == 0.0  # magnitudes do not matter
    assert sign_distance(a, -a) == 2.0
    # A zero neither agrees nor disagrees: Σ = 1 + 0 - 1 = 0 over sqrt(2 · 3) -> 1.
    assert sign_distance(t(1, 0, 1), t(1, 1, -1)) == pytest.approx(1.0)


def test_sign_distance_of_invalid_vectors_is_two():
    assert sign_distance(t(0, 0), t(1, 1)) == 2.0
    assert sign_distance(t(float("nan"), 1), t(1, 1)) == 2.0


def test_layerwise_gives_each_tensor_one_vote():
    # Tensor 1 agrees perfectly (D = 0), tensor 2 is orthogonal (D = 1): mean 0.5. The
    # whole-vector cosine is dominated by the big second tensor: D = 1 - 1/101.
    a, b = t(1, 0, 10, 0), t(1, 0, 0, 10)
    assert layerwise_distance(a, b, [2, 2]) == pytest.approx(0.5)
    assert float(gaf.cosine_distance(a, b)) == pytest.approx(1 - 1 / 101)
    # A tensor that is zero in either vector is left out of the mean.
    assert layerwise_distance(t(1, 2, 0, 0), t(2, 4, 3, 1), [2, 2]) == pytest.approx(0.0)
    # One segment is plain cosine distance.
    x, y = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    assert layerwise_distance(x, y, [50]) == pytest.approx(float(gaf.cosine_distance(x, y)))


def test_layer_grams_sum_to_the_gram_matrix():
    x = torch.randn(4, 30, dtype=torch.float64)
    lg = layer_gram_matrices(x, [5, 10, 15])
    assert lg.shape == (3, 4, 4)
    torch.testing.assert_close(lg.sum(0), gram_matrix(x))


# -- the generic rules ------------------------------------------------------------------------


def _stacks(seed, m=5, p=40, n=30):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        shared = torch.randn(p, generator=g, dtype=torch.float64)
        yield shared * 0.4 + torch.randn(m, p, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("rule", gaf.RULES)
def test_gram_oracle_reproduces_core_decide_exactly(rule):
    for i, x in enumerate(_stacks(0)):
        tau = [0.5, 0.9, 0.97, 1.0, 1.2, 2.0][i % 6]
        a = decide(gram_matrix(x), tau, rule)
        b = decide_with(GramOracle(gram_matrix(x)), tau, rule)
        assert a.accepted.tolist() == b.accepted.tolist()
        assert a.weights.tolist() == b.weights.tolist()
        assert a.distances.tolist() == b.distances.tolist()
        assert a.anchor == b.anchor


def _reference(x, tau, rule, dist):
    """Slow, obvious version of the paper's rule and its variants for any distance."""
    m = x.shape[0]
    if rule == "neighbours":
        d = np.array([[0.0 if i == j else dist(x[i], x[j]) for j in range(m)] for i in range(m)])
        close = d <= tau
        np.fill_diagonal(close, False)
        anchor = int(np.argmax(close.sum(1)))
        acc = close[anchor].copy()
        acc[anchor] = True
        return acc.tolist(), np.where(np.arange(m) == anchor, 0.0, d[anchor]).tolist()
    if rule == "consensus":  # every row against the sum of all the others
        dists = [dist(x.sum(0) - x[k], x[k]) for k in range(m)]
        return [d <= tau for d in dists], dists
    s, acc, dists, count = x[0].clone(), [True], [0.0], 1
    for k in range(1, m):
        ref = x[0] if rule == "anchor" else s
        d = dist(ref, x[k])
        dists.append(d)
        acc.append(d <= tau)
        if d <= tau:
            s = (s + x[k]) / 2 if rule == "halving" else s + x[k]
            count += 1
    return acc, dists


@pytest.mark.parametrize("rule", gaf.RULES)
@pytest.mark.parametrize("measure", ["sign", "layerwise"])
def test_measures_match_slow_reference(rule, measure):
    segments = [10, 25, 5]
    if measure == "sign":
        def dist(a, b):
            return sign_distance(a, b)
    else:
        def dist(a, b):
            return layerwise_distance(a, b, segments)
    for i, x in enumerate(_stacks(1)):
        tau = [0.8, 0.95, 1.0, 1.1][i % 4]
        ref_acc, ref_dist = _reference(x, tau, rule, dist)
        if any(abs(d - tau) < 1e-9 for d in ref_dist[1:]):
            continue  # a tie at tau would make the comparison depend on rounding
        d = decide_with(make_oracle(x, measure, segments), tau, rule)
        assert d.accepted.tolist() == ref_acc
        assert d.distances.tolist() == pytest.approx(ref_dist, abs=1e-9)
        if rule != "halving" and d.num_accepted:
            assert d.weights.sum() == pytest.approx(1.0)


def test_pairwise_oracles_agree_with_distance_functions():
    x = next(iter(_stacks(2)))
    sign = SignOracle(x).pairwise()
    layer = LayerwiseOracle(layer_gram_matrices(x, [20, 20])).pairwise()
    for i in range(5):
        for j in range(5):
            if i != j:
                assert sign[i, j] == pytest.approx(sign_distance(x[i], x[j]))
                assert layer[i, j] == pytest.approx(layerwise_distance(x[i], x[j], [20, 20]))


@pytest.mark.parametrize("measure", ["sign", "layerwise"])
@pytest.mark.parametrize("rule", gaf.RULES)
def test_invalid_rows_are_never_accepted(measure, rule):
    x = torch.randn(4, 12, dtype=torch.float64)
    x[1] = float("nan")
    x[2] = 0.0
    r = filter_gradients(x, 2.0, rule, measure=measure, segments=[6, 6])
    assert r.accepted.tolist() == [True, False, False, True]
    assert r.distances[1] == 2.0 and r.distances[2] == 2.0
    assert r.num_invalid == 2 and r.num_nonfinite == 1
    assert torch.isfinite(r.grad).all()
    torch.testing.assert_close(r.grad, (x[0] + x[3]) / 2)
    assert r.valid.tolist() == [True, False, False, True]


@pytest.mark.parametrize("measure", ["sign", "layerwise"])
def test_all_invalid_skips(measure):
    r = filter_gradients(torch.zeros(3, 4), 2.0, measure=measure, segments=[2, 2])
    assert r.skipped and r.anchor == -1 and r.num_invalid == 3


def test_filter_gradients_with_a_measure():
    # Row 2 flips the sign of 3 of 4 coordinates of row 1: sign distance 1.5 > tau.
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 3.0], [1.0, -1.0, -1.0, -1.0]])
    r = filter_gradients(x, 0.97, measure="sign")
    assert r.accepted.tolist() == [True, True, False]
    assert r.distances.tolist() == pytest.approx([0.0, 0.0, 1.5])
    assert r.extra["measure"] == "sign"
    torch.testing.assert_close(r.grad, (x[0] + x[1]) / 2)
    # Cosine keeps the Gram path and its results.
    c = filter_gradients(x, 0.97)
    assert c.accepted.tolist() == decide(gram_matrix(x), 0.97).accepted.tolist()


def test_bad_measure_arguments():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="unknown measure"):
        filter_gradients(x, 0.97, measure="euclid")
    with pytest.raises(ValueError, match="segments"):
        filter_gradients(x, 0.97, measure="layerwise")
    with pytest.raises(ValueError, match="sum to"):
        filter_gradients(x, 0.97, measure="layerwise", segments=[1, 2])
    with pytest.raises(ValueError, match="positive"):
        filter_gradients(x, 0.97, measure="layerwise", segments=[4, 0])
    with pytest.raises(ValueError, match=r"\[L, M, M\]"):
        LayerwiseOracle(np.zeros((2, 3)))
    assert set(MEASURES) == {"cosine", "sign", "layerwise"}


# -- collector and trainer ----------------------------------------------------------------------


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("measure", ["sign", "layerwise"])
@pytest.mark.parametrize("rule", gaf.RULES)
def test_collector_with_measure_matches_filter(measure, rule):
    model = _model()
    params = list(model.parameters())
    segments = [p.numel() for p in params]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (4, 8), generator=g)
    rows = []
    for k in range(4):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[k]), y[k]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params]))
    expected = filter_gradients(torch.stack(rows), 1.0, rule, measure=measure, segments=segments)
    col = GradientCollector(params, tau=1.0, rule=rule, measure=measure)
    assert col.mode == "stacked"
    model.zero_grad(set_to_none=True)
    for k in range(4):
        nn.functional.cross_entropy(model(x[k]), y[k]).backward()
        col.collect()
    got = col.finish()
    assert got.accepted.tolist() == expected.accepted.tolist()
    assert got.distances.tolist() == pytest.approx(expected.distances.tolist(), abs=1e-12)
    if not got.skipped:
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        torch.testing.assert_close(flat, expected.grad)
    assert col.state_dict()["measure"] == measure


def test_collector_rejects_streaming_with_other_measures():
    with pytest.raises(ValueError, match="stacked"):
        GradientCollector(_model().parameters(), measure="sign", mode="streaming")
    with pytest.raises(ValueError, match="unknown measure"):
        GradientCollector(_model().parameters(), measure="cos")
    col = GradientCollector(_model().parameters(), measure="sign")
    with pytest.raises(ValueError, match="measure"):
        GradientCollector(_model().parameters()).load_state_dict(col.state_dict())


def test_trainer_with_layerwise_measure_steps_and_skips():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = GAFTrainer(model, opt, nn.functional.cross_entropy, 2, tau=2.0,
                         measure="layerwise")
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    out = trainer.step(x, y)
    assert not out.skipped and out.result.extra["measure"] == "layerwise"
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    strict = GAFTrainer(model, opt, nn.functional.cross_entropy, 2, tau=0.0, measure="sign")
    assert strict.step(x, y).skipped  # distance 0 needs identical signs everywhere
    assert math.isfinite(float(out.loss))
