"""gaf.NoiseScale: hand-computed cases, invalid rows, bad input, state round trip, the float64
reference, and synthetic micro-gradients with a known |G|² and tr(Σ)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import gaf
from gaf.noise_scale import step_estimate
from gaf.reference.noise_scale import reference_noise_scale, reference_step

# -- hand-computed cases ---------------------------------------------------------------

# Two rows, b = 2: K = [[5, 1], [1, 3]]. |G|² = 1 (the one off-diagonal entry);
# tr(Σ) = mean(2 (5 - 1), 2 (3 - 1)) = mean(8, 4) = 6; B = 6.
K2 = [[5.0, 1.0], [1.0, 3.0]]
# Three rows, sizes 1, 2, 4: off-diagonal 2, 3, 4 → |G|² = 3;
# tr(Σ) = mean(1 (10 - 3), 2 (7 - 3), 4 (5 - 3)) = mean(7, 8, 8) = 23/3.
K3 = [[10.0, 2.0, 3.0], [2.0, 7.0, 4.0], [3.0, 4.0, 5.0]]


def test_one_step_by_hand():
    noise = gaf.NoiseScale()
    est = noise.update(torch.tensor(K2), 2)
    assert (est.grad_sq, est.trace_cov, est.num_valid) == (1.0, 6.0, 2)
    # After one step the bias correction undoes the (1 - beta) factor exactly.
    assert noise.grad_sq == pytest.approx(1.0, rel=1e-12)
    assert noise.trace_cov == pytest.approx(6.0, rel=1e-12)
    assert noise.b_simple == pytest.approx(6.0, rel=1e-12)
    assert noise.expected_distance(6) == pytest.approx(0.5)
    assert noise.expected_distance(2) == pytest.approx(6 / 8)
    # Two sizes: 1 - 1/sqrt((1 + 6/2)(1 + 6/6)) = 1 - 1/sqrt(8).
    assert noise.expected_distance(2, 6) == pytest.approx(1 - 1 / math.sqrt(8))
    assert noise.micro_batch_for(0.97) == pytest.approx(6 * 0.03 / 0.97)
    assert noise.micro_batch_for(0.5) == pytest.approx(6.0)
    assert noise.micro_batch_for(1.0) == 0.0
    # At the returned size the forecast meets tau.
    assert noise.expected_distance(noise.micro_batch_for(0.8)) == pytest.approx(0.8)


def test_unequal_sizes_by_hand():
    est = step_estimate(np.array(K3), [1, 2, 4])
    assert est.grad_sq == pytest.approx(3.0)
    assert est.trace_cov == pytest.approx(23 / 3)


def test_two_steps_exponential_average_by_hand():
    # beta = 0.5: a = 0.5·0.5·x1 + 0.5·x2, corrected by 1 - 0.25 = 0.75.
    noise = gaf.NoiseScale(beta=0.5)
    noise.update(np.array(K2), 2)
    noise.update(np.array(K3), [1, 2, 4])
    assert noise.num_steps == 2
    assert noise.grad_sq == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)  # 7/3
    assert noise.trace_cov == pytest.approx((0.25 * 6 + 0.5 * 23 / 3) / 0.75)  # 64/9
    assert noise.b_simple == pytest.approx((64 / 9) / (7 / 3))  # ratio of the averages
    assert noise.last.grad_sq == pytest.approx(3.0)


def test_two_equal_rows_give_half_the_squared_difference():
    # M = 2, equal b: tr(Σ) estimate = (b/2) |g1 - g2|², |G|² estimate = g1 · g2.
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, -1.0, 3.0]], dtype=torch.float64)
    est = step_estimate(x @ x.T, 8)
    assert est.grad_sq == pytest.approx(float(x[0] @ x[1]))
    assert est.trace_cov == pytest.approx(4 * float((x[0] - x[1]).pow(2).sum()))


def test_parallel_rows_have_no_noise_and_opposed_rows_no_signal():
    x = torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    noise = gaf.NoiseScale()
    est = noise.update(gaf.gram_matrix(x), 4)
    assert est.grad_sq == pytest.approx(25.0) and est.trace_cov == pytest.approx(0.0, abs=1e-5)
    assert noise.b_simple is not None and noise.b_simple < 1e-6
    opposed = gaf.NoiseScale()
    opposed.update(gaf.gram_matrix(torch.tensor([[3.0, 4.0], [-3.0, -4.0]])), 4)
    assert opposed.grad_sq == pytest.approx(-25.0)
    assert opposed.b_simple == math.inf  # the signal is not distinguishable from zero
    assert opposed.expected_distance(64) == 1.0
    assert opposed.micro_batch_for(0.97) == math.inf


def test_nothing_measured_yet_is_none_not_nan():
    noise = gaf.NoiseScale()
    assert noise.grad_sq is None and noise.trace_cov is None and noise.b_simple is None
    assert noise.expected_distance(8) is None and noise.micro_batch_for(0.97) is None
    assert noise.num_steps == 0 and noise.last is None


# -- invalid rows ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.0])
def test_invalid_rows_are_left_out(bad):
    x = torch.tensor([[1.0, 2.0, 0.5], [2.0, 1.0, -1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
                     dtype=torch.float64)
    x[1] = bad
    sizes = [4, 8, 16, 32]
    est = step_estimate(x @ x.T, sizes)
    keep = [0, 2, 3]
    clean = step_estimate(x[keep] @ x[keep].T, [sizes[i] for i in keep])
    assert est.num_valid == 3
    assert est.grad_sq == pytest.approx(clean.grad_sq)
    assert est.trace_cov == pytest.approx(clean.trace_cov)


def test_non_finite_product_drops_its_rows():
    k = np.array(K3)
    k[0, 2] = k[2, 0] = math.nan  # finite norms, corrupted product: rows 0 and 2 leave
    est = step_estimate(k, [1, 2, 4])
    assert est is None  # one valid row left


def test_fewer_than_two_valid_rows_change_nothing():
    noise = gaf.NoiseScale()
    noise.update(np.array(K2), 2)
    before = noise.state_dict()
    x = torch.tensor([[1.0, 2.0], [math.nan, 0.0], [0.0, 0.0]])
    assert noise.update(gaf.gram_matrix(x), 4) is None
    assert noise.update(torch.tensor([[4.0]]), 4) is None  # M = 1
    assert noise.state_dict() == before


# -- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gram", "sizes", "error", "match"),
    [
        (np.ones(3), 2, ValueError, "square"),
        (np.ones((2, 3)), 2, ValueError, "square"),
        (np.ones((0, 0)), 2, ValueError, "square"),
        ([[1.0, 0.0], [0.0, 1.0]], 2, TypeError, "gram must be"),
        (np.array(K2), [2, 2, 2], ValueError, "one per row"),
        (np.array(K2), 0, ValueError, "positive"),
        (np.array(K2), [2, -1], ValueError, "positive"),
        (np.array(K2), 2.5, TypeError, "sizes"),
        (np.array(K2), [2, 2.5], ValueError, "whole numbers"),
        (np.array(K2), True, TypeError, "integers"),
        (np.array(K2), "2", TypeError, "sizes"),
        (np.array([[5.0, 1.0], [2.0, 3.0]]), 2, ValueError, "not symmetric"),
    ],
)
def test_bad_input_is_named(gram, sizes, error, match):
    noise = gaf.NoiseScale()
    with pytest.raises(error, match=match):
        noise.update(gram, sizes)
    assert noise.num_steps == 0


def test_float32_rounding_is_not_asymmetry():
    x = torch.randn(6, 100_000, generator=torch.Generator().manual_seed(0))
    g = x @ x.T  # float32 products: K_ij and K_ji may differ in the last bits
    assert gaf.NoiseScale().update(g, 1) is not None


@pytest.mark.parametrize("beta", [1.0, -0.1, 1.5, math.nan])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta must lie in"):
        gaf.NoiseScale(beta)


@pytest.mark.parametrize("beta", ["0.9", True, None])
def test_beta_of_wrong_type(beta):
    with pytest.raises(TypeError, match="beta"):
        gaf.NoiseScale(beta)


def test_bad_forecast_arguments():
    noise = gaf.NoiseScale()
    noise.update(np.array(K2), 2)
    for b in (0, -1, math.nan, math.inf):
        with pytest.raises(ValueError, match="positive"):
            noise.expected_distance(b)
    with pytest.raises(TypeError, match="positive"):
        noise.expected_distance("8")
    for tau in (0.0, -0.5, 2.5, math.nan):
        with pytest.raises(ValueError, match="tau must lie in"):
            noise.micro_batch_for(tau)
    with pytest.raises(TypeError, match="tau"):
        noise.micro_batch_for(None)


# -- state -----------------------------------------------------------------------------


def test_state_round_trip():
    gen = torch.Generator().manual_seed(3)
    a = gaf.NoiseScale(beta=0.9)
    for _ in range(7):
        x = torch.randn(4, 50, generator=gen, dtype=torch.float64) + 0.3
        a.update(x @ x.T, [1, 2, 3, 4])
    state = json.loads(json.dumps(a.state_dict()))  # plain numbers: JSON and torch.save safe
    b = gaf.NoiseScale()
    b.load_state_dict(state)
    assert (b.beta, b.num_steps) == (0.9, 7)
    assert (b.grad_sq, b.trace_cov, b.b_simple) == (a.grad_sq, a.trace_cov, a.b_simple)
    x = torch.randn(4, 50, generator=gen, dtype=torch.float64) + 0.3
    a.update(x @ x.T, 5)
    b.update(x @ x.T, 5)
    assert b.state_dict() == a.state_dict()


@pytest.mark.parametrize(
    "state",
    [
        {"beta": 0.9},
        {"beta": 0.9, "num_steps": -1, "grad_sq_avg": 0.0, "trace_cov_avg": 0.0},
        {"beta": 0.9, "num_steps": 1, "grad_sq_avg": math.nan, "trace_cov_avg": 0.0},
        {"beta": 1.0, "num_steps": 1, "grad_sq_avg": 1.0, "trace_cov_avg": 1.0},
    ],
)
def test_bad_state_is_refused(state):
    noise = gaf.NoiseScale()
    with pytest.raises(ValueError):
        noise.load_state_dict(state)
    assert noise.num_steps == 0


# -- the float64 reference -------------------------------------------------------------


def test_agrees_with_the_float64_reference():
    rng = np.random.default_rng(11)
    steps = []
    for t in range(60):
        m = int(rng.integers(1, 7))
        x = rng.normal(size=(m, 30)) + rng.normal(size=30) * 0.5
        if t % 5 == 1:
            x[rng.integers(m)] = np.nan
        if t % 7 == 2:
            x[rng.integers(m)] = 0.0
        k = x @ x.T
        sizes = [int(s) for s in rng.integers(1, 65, size=m)]
        steps.append((k, sizes))
    for beta in (0.0, 0.5, 0.99):
        noise = gaf.NoiseScale(beta)
        for k, sizes in steps:
            est = noise.update(k, sizes)
            ref = reference_step(k.tolist(), sizes)
            assert (est is None) == (ref is None)
            if est is not None:
                assert est.grad_sq == pytest.approx(ref[0], rel=1e-12, abs=1e-12)
                assert est.trace_cov == pytest.approx(ref[1], rel=1e-12, abs=1e-12)
        ref = reference_noise_scale([(k.tolist(), s) for k, s in steps], beta)
        assert noise.num_steps == ref["num_steps"] > 30
        for key in ("grad_sq", "trace_cov", "b_simple"):
            assert getattr(noise, key) == pytest.approx(ref[key], rel=1e-10)


# -- synthetic micro-gradients with a known |G|² and tr(Σ) -----------------------------


def micro_gradients(grad, sizes, noise_sd, gen):
    """Each row: grad plus the mean of b_i per-sample noises (independent, mean 0,
    covariance noise_sd² I, so tr(Σ) = noise_sd² P)."""
    samples = noise_sd * torch.randn(sum(sizes), grad.numel(), generator=gen)
    return grad + torch.stack([part.mean(0) for part in samples.split(sizes)])


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [[16] * 8, [4, 8, 16, 32], [2, 2]])
def test_known_noise_scale_is_recovered(sizes):
    # The check: |G|² = 1, tr(Σ) = 64 (B = 64), P = 2000, 600 steps, default beta.
    p, trace = 2000, 64.0
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(p, generator=gen)
    grad /= grad.norm()
    noise = gaf.NoiseScale()
    for _ in range(600):
        x = micro_gradients(grad, sizes, math.sqrt(trace / p), gen)
        noise.update(x @ x.T, sizes)
    assert noise.b_simple == pytest.approx(64.0, rel=0.10)
    assert noise.grad_sq == pytest.approx(1.0, rel=0.10)
    assert noise.trace_cov == pytest.approx(64.0, rel=0.05)


def test_step_estimates_are_unbiased_with_unequal_sizes_and_non_gaussian_noise():
    # Rademacher per-sample noise, sizes 1, 3, 5: the mean of the per-step estimates over
    # many steps converges to |G|² = 4 and tr(Σ) = P · 1 = 100 (no smoothing involved).
    p, sizes, steps = 100, [1, 3, 5], 4000
    gen = torch.Generator().manual_seed(5)
    grad = torch.randn(p, generator=gen, dtype=torch.float64)
    grad *= 2 / grad.norm()
    signs = [torch.randint(0, 2, (steps, b, p), generator=gen, dtype=torch.float64) * 2 - 1
             for b in sizes]
    x = grad + torch.stack([s.mean(1) for s in signs], dim=1)  # [steps, 3, p]
    grams = (x @ x.transpose(1, 2)).numpy()
    g_sum = t_sum = 0.0
    for k in grams:
        est = step_estimate(k, sizes)
        g_sum += est.grad_sq
        t_sum += est.trace_cov
    # Standard errors of these means: about 0.04 for |G|² and 0.2 for tr(Σ).
    assert g_sum / steps == pytest.approx(4.0, abs=0.25)
    assert t_sum / steps == pytest.approx(100.0, abs=2.0)


def test_forecast_distance_matches_observed_in_high_dimension():
    # B = 64; two micro-gradients of b samples in P = 20000 dimensions: observed cosine
    # distance concentrates near B / (B + b).
    p, trace = 20_000, 64.0
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(p, generator=gen, dtype=torch.float64)
    grad /= grad.norm()
    noise = gaf.NoiseScale()
    noise.load_state_dict({"beta": 0.99, "num_steps": 1, "grad_sq_avg": 0.01,
                           "trace_cov_avg": 0.64})  # exactly B = 64
    for b in (4, 16, 64):
        d = []
        for _ in range(20):
            x = grad + math.sqrt(trace / p / b) * torch.randn(2, p, generator=gen,
                                                                dtype=torch.float64)
            d.append(float(gaf.cosine_distance(x[0], x[1])))
        assert np.median(d) == pytest.approx(noise.expected_distance(b), abs=0.03)


def test_filter_gradients_hands_back_its_gram_matrix():
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    res = gaf.filter_gradients(x, tau=0.97)
    assert torch.equal(res.extra["gram"], gaf.gram_matrix(x))
    assert "gram" not in gaf.filter_gradients(x, measure="sign").extra
