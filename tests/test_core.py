"""The filter core: hand-computed cases, reference agreement, edge equivalences, bad input."""

import math

import numpy as np
import pytest
import torch

import gaf
from gaf.core import ANCHORED_RULES, RULES, decide, gram_matrix
from gaf.reference import reference_filter


def rows(*vectors):
    return torch.tensor(vectors, dtype=torch.float64)


# --- hand-computed cases -------------------------------------------------------------


def test_cosine_distance_3_4_5_triangle():
    a = torch.tensor([3.0, 4.0])
    b = torch.tensor([4.0, 3.0])
    # cos = 24 / 25
    assert gaf.cosine_distance(a, b).item() == pytest.approx(1 - 24 / 25, abs=1e-7)
    assert gaf.cosine_distance(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert gaf.cosine_distance(a, -a).item() == pytest.approx(2.0, abs=1e-7)
    assert gaf.cosine_distance(a, torch.tensor([-4.0, 3.0])).item() == pytest.approx(1.0)


def test_cosine_distance_zero_vector_agrees_with_nothing():
    d = gaf.cosine_distance(torch.zeros(3), torch.ones(3))
    assert d.item() == 2.0
    d = gaf.cosine_distance(torch.tensor([float("nan"), 1.0]), torch.ones(2))
    assert d.item() == 2.0


def test_parallel_vectors_all_accepted():
    x = rows([1, 2, 0], [2, 4, 0], [0.5, 1, 0])
    for rule in RULES:
        r = gaf.filter_gradients(x, tau=0.1, rule=rule)
        assert r.accepted.tolist() == [True, True, True], rule
        assert not r.skipped
        assert r.num_accepted == 3
    r = gaf.filter_gradients(x, tau=0.1)
    assert torch.allclose(r.grad, torch.tensor([3.5, 7, 0], dtype=torch.float64) / 3)


def test_orthogonal_vectors_mean_rule():
    # e1, e2: D(e1, e2) = 1. At tau = 0.97 rejected, at tau = 1 accepted.
    x = rows([1, 0, 0], [0, 1, 0], [0, 0, 1])
    r = gaf.filter_gradients(x, tau=0.97)
    assert r.accepted.tolist() == [True, False, False]
    assert r.skipped
    assert r.distances.tolist() == pytest.approx([0.0, 1.0, 1.0])
    r = gaf.filter_gradients(x, tau=1.0)
    # s = e1 + e2 then D(s, e3) = 1 as well: all accepted at tau = 1.
    assert r.accepted.tolist() == [True, True, True]
    assert torch.allclose(r.grad, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_opposed_vectors():
    x = rows([1, 1], [-1, -1])
    r = gaf.filter_gradients(x, tau=1.99)
    assert r.accepted.tolist() == [True, False]
    assert r.skipped
    r = gaf.filter_gradients(x, tau=2.0)
    assert r.accepted.tolist() == [True, True]
    assert torch.equal(r.grad, torch.zeros(2, dtype=torch.float64))


def test_running_sum_changes_the_decision():
    # g1 = (1, 0), g2 = (0, 1): D = 1 <= 1.0 → s = (1, 1).
    # g3 = (-1, 0.2): D(g1, g3) ≈ 1.98 but D(s, g3) = 1 - (-0.8)/(√2·√1.04) ≈ 1.5547.
    x = rows([1, 0], [0, 1], [-1, 0.2])
    mean = gaf.filter_gradients(x, tau=1.6, rule="mean")
    anchor = gaf.filter_gradients(x, tau=1.6, rule="anchor")
    assert mean.accepted.tolist() == [True, True, True]
    assert anchor.accepted.tolist() == [True, True, False]
    assert mean.distances[2].item() == pytest.approx(1 + 0.8 / (math.sqrt(2) * math.sqrt(1.04)))


def test_halving_weights_later_rows_more():
    x = rows([1, 0], [0, 1], [0, 2])
    r = gaf.filter_gradients(x, tau=2.0, rule="halving")
    # ((g1 + g2)/2 + g3)/2 = (0.25, 0.25 + 1)
    assert torch.allclose(r.grad, torch.tensor([0.25, 1.25], dtype=torch.float64))
    assert r.weights.tolist() == [0.25, 0.25, 0.5]


def test_neighbours_picks_the_densest_row():
    # Rows 1, 2, 3 point roughly the same way; row 0 is orthogonal to them.
    x = rows([1, 0, 0], [0, 1, 0.1], [0, 1, -0.1], [0, 1, 0])
    r = gaf.filter_gradients(x, tau=0.1, rule="neighbours")
    assert r.anchor == 1
    assert r.accepted.tolist() == [False, True, True, True]
    assert r.distances[1].item() == 0.0
    assert torch.allclose(r.grad, torch.tensor([0, 1, 0], dtype=torch.float64))


def test_all_rules_coincide_for_two_rows():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        x = torch.randn(2, 7, generator=gen, dtype=torch.float64)
        tau = float(torch.rand(1, generator=gen)) * 2
        results = [gaf.filter_gradients(x, tau, rule) for rule in ANCHORED_RULES]
        for r in results[1:]:
            assert r.accepted.tolist() == results[0].accepted.tolist()
            assert torch.allclose(r.grad, results[0].grad)
        # Consensus has no anchor: it takes the same steps with the same direction, and
        # on a skip accepts neither row.
        c = gaf.filter_gradients(x, tau, "consensus")
        assert c.skipped == results[0].skipped
        if not c.skipped:
            assert c.accepted.tolist() == results[0].accepted.tolist()
            assert torch.allclose(c.grad, results[0].grad)
        else:
            assert c.num_accepted == 0


# --- invalid rows ----------------------------------------------------------------------


def test_nonfinite_and_zero_rows_agree_with_nothing():
    x = rows([1, 1], [float("inf"), 0], [0, 0], [1, 1.1], [float("nan"), 1])
    for rule in RULES:
        r = gaf.filter_gradients(x, tau=2.0, rule=rule)
        assert r.accepted.tolist() == [True, False, False, True, False], rule
        assert r.num_invalid == 3
        assert torch.isfinite(r.grad).all()
        assert torch.isfinite(r.distances).all()
        assert torch.allclose(r.grad, torch.tensor([1, 1.05], dtype=torch.float64))


def test_invalid_first_row_passes_the_anchor_on():
    x = rows([float("nan"), 0], [1, 0], [1, 0.01])
    r = gaf.filter_gradients(x, tau=0.5)
    assert r.anchor == 1
    assert r.accepted.tolist() == [False, True, True]
    assert r.distances[0].item() == 2.0


def test_all_rows_invalid_gives_zero_and_skip():
    x = rows([0, 0], [float("inf"), 1])
    r = gaf.filter_gradients(x, tau=2.0)
    assert r.skipped and r.num_accepted == 0
    assert torch.equal(r.grad, torch.zeros(2, dtype=torch.float64))


# --- fast path against the reference ------------------------------------------------------


def _near_threshold_cases(gen, count):
    """Random stacks plus a tau placed just beside one of the distances the rule will test."""
    for _ in range(count):
        m = int(torch.randint(1, 9, (1,), generator=gen))
        p = int(torch.randint(1, 40, (1,), generator=gen))
        base = torch.randn(p, generator=gen, dtype=torch.float64)
        spread = float(torch.rand(1, generator=gen)) * 3
        x = base + spread * torch.randn(m, p, generator=gen, dtype=torch.float64)
        yield x


@pytest.mark.parametrize("rule", RULES)
def test_fast_path_matches_reference(rule):
    gen = torch.Generator().manual_seed(1234)
    checked = 0
    for x in _near_threshold_cases(gen, 80):
        for tau in (0.0, 0.3, 0.97, 1.0, 1.5, 2.0):
            checked += _assert_agree(x, tau, rule)
        # Near-threshold: tau set to each tested distance, and a hair either side.
        probe = reference_filter(x, 1.0, rule)["distances"]
        for d in probe[1:]:
            for tau in (d - 1e-9, d + 1e-9):
                if 0 <= tau <= 2:
                    checked += _assert_agree(x, tau, rule)
    assert checked > 450


def _assert_agree(x, tau, rule):
    ref = reference_filter(x, tau, rule)
    if any(abs(d - tau) < 1e-12 for d in ref["distances"][1:]):
        return 0  # an exact tie: rounding, not the rule, decides; 1e-9 either side is tested
    fast = gaf.filter_gradients(x, tau, rule)
    assert fast.accepted.tolist() == ref["accepted"], (tau, rule)
    assert fast.distances.tolist() == pytest.approx(ref["distances"], abs=1e-9)
    assert torch.allclose(fast.grad, ref["grad"], atol=1e-10, rtol=1e-9)
    return 1


# --- edge equivalences --------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["mean", "anchor", "neighbours"])
def test_tau_two_is_the_plain_mean(rule):
    gen = torch.Generator().manual_seed(7)
    for m in (1, 2, 3, 8, 16):
        x = torch.randn(m, 50, generator=gen)
        r = gaf.filter_gradients(x, tau=2.0, rule=rule)
        assert r.num_accepted == m
        assert torch.allclose(r.grad, x.mean(0), atol=1e-6)
        assert r.skipped == (m < 2)


def test_threshold_nothing_meets_skips():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 30, generator=gen)
    for rule in ANCHORED_RULES:
        r = gaf.filter_gradients(x, tau=0.0, rule=rule)
        assert r.skipped and r.num_accepted == 1
    r = gaf.filter_gradients(x, tau=0.0, rule="consensus")
    assert r.skipped and r.num_accepted == 0


def test_half_precision_uses_float64_gram():
    x = torch.randn(4, 1000).half()
    assert gram_matrix(x).dtype == torch.float64
    r = gaf.filter_gradients(x, tau=2.0)
    assert r.grad.dtype == torch.float16
    assert torch.allclose(r.grad.float(), x.float().mean(0), atol=2e-3)


def test_decide_accepts_numpy_and_tensor_gram_alike():
    x = torch.randn(5, 12, dtype=torch.float64)
    g = gram_matrix(x)
    a = decide(g, 0.97, "mean")
    b = decide(g.numpy(), 0.97, "mean")
    assert np.array_equal(a.accepted, b.accepted) and np.array_equal(a.weights, b.weights)


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grads, tau, rule, error, match",
    [
        (torch.ones(3), 0.5, "mean", ValueError, "2-D"),
        (torch.ones(2, 2, 2), 0.5, "mean", ValueError, "2-D"),
        (torch.ones(0, 4), 0.5, "mean", ValueError, "M = 0"),
        (torch.ones(2, 4, dtype=torch.int64), 0.5, "mean", TypeError, "floating"),
        ([[1.0, 2.0]], 0.5, "mean", TypeError, "torch.Tensor"),
        (torch.ones(2, 4), float("nan"), "mean", ValueError, "finite"),
        (torch.ones(2, 4), float("inf"), "mean", ValueError, "finite"),
        (torch.ones(2, 4), -0.1, "mean", ValueError, r"\[0, 2\]"),
        (torch.ones(2, 4), 2.5, "mean", ValueError, r"\[0, 2\]"),
        (torch.ones(2, 4), "0.9", "mean", TypeError, "real number"),
        (torch.ones(2, 4), 0.5, "median", ValueError, "unknown rule"),
    ],
)
def test_bad_input_is_named(grads, tau, rule, error, match):
    with pytest.raises(error, match=match):
        gaf.filter_gradients(grads, tau=tau, rule=rule)


def test_cosine_distance_bad_input():
    with pytest.raises(ValueError, match="shapes differ"):
        gaf.cosine_distance(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="flat"):
        gaf.cosine_distance(torch.ones(2, 2), torch.ones(2, 2))
    with pytest.raises(TypeError, match="floating"):
        gaf.cosine_distance(torch.ones(3, dtype=torch.int32), torch.ones(3))


# --- the consensus rule: hand-computed cases ----------------------------------------------


def test_consensus_parallel_rows_all_agree():
    r = gaf.filter_gradients(rows([1, 0], [2, 0], [3, 0]), tau=0.1, rule="consensus")
    assert r.accepted.tolist() == [True, True, True]
    assert r.anchor == -1  # no row is privileged
    assert r.distances.tolist() == pytest.approx([0.0, 0.0, 0.0])
    assert torch.allclose(r.grad, torch.tensor([2.0, 0], dtype=torch.float64))


def test_consensus_orthogonal_rows():
    # e_k against the sum of the other two: orthogonal, D = 1.
    x = rows([1, 0, 0], [0, 1, 0], [0, 0, 1])
    r = gaf.filter_gradients(x, tau=0.97, rule="consensus")
    assert r.accepted.tolist() == [False, False, False] and r.skipped
    assert r.distances.tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert torch.equal(r.grad, torch.zeros(3, dtype=torch.float64))
    r = gaf.filter_gradients(x, tau=1.0, rule="consensus")
    assert r.accepted.tolist() == [True, True, True]


def test_consensus_opposed_row_is_the_one_rejected():
    # Rows 0-2 see the others' sum (1, 0): D = 0. Row 3 sees (3, 0): D = 2.
    x = rows([1, 0], [1, 0], [1, 0], [-1, 0])
    r = gaf.filter_gradients(x, tau=1.5, rule="consensus")
    assert r.accepted.tolist() == [True, True, True, False]
    assert r.distances.tolist() == pytest.approx([0.0, 0.0, 0.0, 2.0])
    assert torch.allclose(r.grad, torch.tensor([1.0, 0], dtype=torch.float64))
    # Unlike the paper's rule, an opposed first row is not kept as the anchor.
    first = rows([-1, 0], [1, 0], [1, 0], [1, 0])
    assert gaf.filter_gradients(first, 1.5, "consensus").accepted.tolist() == [
        False, True, True, True]
    assert gaf.filter_gradients(first, 1.5, "mean").accepted.tolist()[0]


def test_consensus_two_of_three():
    # (1,0) vs (1,2): cos = 1/√5; (0,1) vs (2,1): the same; (1,1) vs (1,1): D = 0.
    x = rows([1, 0], [0, 1], [1, 1])
    d = 1 - 1 / math.sqrt(5)
    r = gaf.filter_gradients(x, tau=0.5, rule="consensus")
    assert r.distances.tolist() == pytest.approx([d, d, 0.0])
    assert r.accepted.tolist() == [False, False, True] and r.skipped
    r = gaf.filter_gradients(x, tau=0.6, rule="consensus")
    assert r.accepted.tolist() == [True, True, True]
    assert torch.allclose(r.grad, torch.tensor([2 / 3, 2 / 3], dtype=torch.float64))


def test_consensus_ignores_invalid_rows_in_the_sum():
    # The NaN and zero rows are left out of S: rows 0 and 3 are compared with each other.
    x = rows([1, 0], [float("nan"), 1], [0, 0], [1, 1])
    r = gaf.filter_gradients(x, tau=0.3, rule="consensus")
    d = 1 - 1 / math.sqrt(2)
    assert r.distances.tolist() == pytest.approx([d, 2.0, 2.0, d])
    assert r.accepted.tolist() == [True, False, False, True]
    # One valid row: the others' sum is zero, which agrees with nothing.
    r = gaf.filter_gradients(rows([1, 0], [0, 0]), tau=2.0, rule="consensus")
    assert r.distances.tolist() == [2.0, 2.0] and r.skipped


def test_zero_vectors_agree_with_nothing_everywhere():
    # One convention for cosine_distance, distance_from_products and the reference: 2.
    from gaf.core import distance_from_products
    from gaf.reference import reference_distance

    zero, one = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    assert gaf.cosine_distance(zero, one).item() == 2.0
    assert distance_from_products(0.0, 0.0, 3.0) == 2.0
    assert reference_distance(zero, one) == 2.0
    # A running sum that cancels (g, -g at tau = 2): the next row is 2 away from it.
    r = gaf.filter_gradients(rows([1, 0], [-1, 0], [0, 1]), 2.0)
    assert r.accepted.tolist() == [True, True, True]
    assert r.distances.tolist() == [0.0, 2.0, 2.0]
