"""Robust rules over the Gram matrix (multi-Krum, geometric median) and coordinate-wise
median / trimmed mean: hand-computed cases, float64 references, corrupted stacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gaf
from gaf.core import gram_matrix, weighted_sum
from gaf.core.coordinatewise import check_trim, coordinatewise
from gaf.core.robust import check_krum, geometric_median, multi_krum
from gaf.reference.robust import (
    reference_coordinatewise,
    reference_geometric_median,
    reference_multi_krum,
)


def direction(x, decision):
    return weighted_sum(x, decision.weights, torch.empty(x.shape[1], dtype=x.dtype))


def column(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).reshape(-1, 1)


# -- hand-computed cases ---------------------------------------------------------------


def test_krum_scores_by_hand():
    # 1-D rows 1, 2, 4, 10, 20; M = 5, f = 1: each row scores its k = 2 nearest.
    # Scores: 1 → 1+9 = 10; 2 → 1+4 = 5; 4 → 4+9 = 13; 10 → 36+64 = 100; 20 → 100+256.
    x = column([1, 2, 4, 10, 20])
    d = multi_krum(gram_matrix(x), f=1)  # keeps m = M - f = 4: rows 2, 1, 4, 10
    assert d.accepted.tolist() == [True, True, True, True, False]
    assert d.anchor == 1
    assert direction(x, d).item() == pytest.approx(17 / 4)
    krum = multi_krum(gram_matrix(x), f=1, m=1)
    assert krum.accepted.tolist() == [False, True, False, False, False]
    assert direction(x, krum).item() == 2.0
    two = multi_krum(gram_matrix(x), f=1, m=2)
    assert two.accepted.tolist() == [True, True, False, False, False]


def test_one_opposed_row_among_parallel_ones():
    e = torch.tensor([[3.0, 4.0, 0.0]], dtype=torch.float64)
    x = torch.cat([e, 2 * e, e, 0.5 * e, -e])
    d = multi_krum(gram_matrix(x), f=1)
    assert d.accepted.tolist() == [True, True, True, True, False]
    assert d.distances[:4] == pytest.approx([0.0] * 4, abs=1e-12)
    assert d.distances[4] == pytest.approx(2.0)
    # The median of four points on a ray and one opposed sits inside the ray's cluster;
    # the opposed row's weight is the smallest.
    gm = geometric_median(gram_matrix(x))
    assert gm.weights.argmin() == 4
    assert gm.accepted.all()
    assert torch.nn.functional.cosine_similarity(direction(x, gm), e[0], dim=0) > 0.999


def test_geometric_median_of_identical_rows_and_an_outlier_by_hand():
    # Four copies of e and -e: z = (1 - 2w) e with w the weight of -e, so each copy sits
    # within the smoothing ν·rms = 1e-3 of z and gets α = 1000, and -e gets α = 1/|z + e|
    # = 1/(2 - 2w). The fixed point w = α/(4000 + α) solves 4000 w = (1 - w) α = 1/2:
    # w = 1/8000 exactly.
    e = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    x = torch.cat([e, e, e, e, -e])
    gm = geometric_median(gram_matrix(x), nu=1e-3)
    expected = np.array([(1 - 1 / 8000) / 4] * 4 + [1 / 8000])
    np.testing.assert_allclose(gm.weights, expected, rtol=1e-6)
    assert gm.anchor == 0


def test_two_outliers():
    gen = torch.Generator().manual_seed(0)
    honest = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) + 0.05 * torch.randn(
        5, 3, generator=gen, dtype=torch.float64)
    outliers = torch.tensor([[0.0, 10.0, 0.0], [-10.0, 0.0, 0.0]], dtype=torch.float64)
    x = torch.cat([honest[:2], outliers[:1], honest[2:], outliers[1:]])  # rows 2 and 6 bad
    d = multi_krum(gram_matrix(x), f=2)
    assert d.accepted.tolist() == [True, True, False, True, True, True, False]
    gm = geometric_median(gram_matrix(x))
    assert gm.weights[[2, 6]].max() < gm.weights[[0, 1, 3, 4, 5]].min()
    med = torch.empty(3, dtype=torch.float64)
    coordinatewise(x, None, med)
    torch.testing.assert_close(med, honest.median(dim=0).values, atol=0.1, rtol=0)


# -- options -----------------------------------------------------------------------------


def test_krum_rejects_too_few_rows_clearly():
    with pytest.raises(ValueError, match=r"more than 2f \+ 2 = 4 micro-gradients, got M = 4"):
        check_krum(4, f=1)
    with pytest.raises(ValueError, match="at most M - f = 4"):
        check_krum(5, f=1, m=5)
    with pytest.raises(TypeError, match="f .* must be an int"):
        check_krum(8, f=1.5)
    with pytest.raises(ValueError, match="nu"):
        geometric_median(np.eye(3), nu=0.0)
    with pytest.raises(ValueError, match="needs more than that many"):
        check_trim(4, 2)
    assert check_krum(4, f=0) == (0, 4)


def test_spec_checks_the_row_count_before_any_step():
    # A front end that knows M (ranks × micro-batches) refuses before the first step.
    spec = gaf.FilterSpec(rule="multi-krum", rule_options={"f": 2})
    with pytest.raises(ValueError, match=r"more than 2f \+ 2 = 6 micro-gradients, got M = 4"):
        spec.check_rows(4)
    spec.check_rows(7)
    with pytest.raises(ValueError, match="at most M - f = 5"):
        gaf.FilterSpec(rule="multi-krum", rule_options={"f": 2, "m": 6}).check_rows(7)
    for rule in gaf.RULES + ("geometric-median",):  # no row-count condition
        gaf.FilterSpec(rule=rule).check_rows(1)


# -- against the float64 references ------------------------------------------------------


def random_rows(seed: int, m: int, p: int, invalid: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(p, generator=gen, dtype=torch.float64)
    x = base + torch.rand(m, 1, generator=gen, dtype=torch.float64) * 2 * torch.randn(
        m, p, generator=gen, dtype=torch.float64)
    if invalid:
        x[1] = float("nan")
        x[m - 2] = 0.0
    return x


@pytest.mark.parametrize("invalid", [False, True])
def test_multi_krum_matches_reference(invalid):
    for seed in range(12):
        m = 6 + seed % 5
        x = random_rows(seed, m, 17, invalid)
        for f, keep in ((1, None), (1, 1), (2, None), (2, 3)):
            if m <= 2 * f + 2:
                continue
            d = multi_krum(gram_matrix(x), f=f, m=keep)
            ref = reference_multi_krum(x, f=f, m=keep)
            assert d.accepted.tolist() == ref["accepted"]
            torch.testing.assert_close(direction(x, d), ref["grad"], rtol=1e-12, atol=1e-12)
            assert d.valid.tolist() == [i in ref["scores"] for i in range(m)]


@pytest.mark.parametrize("invalid", [False, True])
def test_geometric_median_matches_reference(invalid):
    for seed in range(8):
        x = random_rows(seed, 5 + seed % 4, 13, invalid)
        for nu, iters in ((1e-3, 100), (1e-1, 3)):
            d = geometric_median(gram_matrix(x), nu=nu, max_iter=iters)
            ref = reference_geometric_median(x, nu=nu, max_iter=iters)
            np.testing.assert_allclose(d.weights, ref["weights"], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(direction(x, d), ref["grad"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("invalid", [False, True])
def test_coordinatewise_matches_reference(invalid):
    for seed in range(6):
        x = random_rows(seed, 4 + seed, 11, invalid)
        for trim in (None, 0, 1):
            out = torch.empty(11, dtype=torch.float64)
            d = coordinatewise(x, trim, out)
            torch.testing.assert_close(out, reference_coordinatewise(x, trim), rtol=1e-12,
                                       atol=1e-12)
            assert d.weights.sum() == pytest.approx(1.0)
            assert not d.accepted[~d.valid].any()


def test_geometric_median_is_scale_free_and_stops_early():
    x = random_rows(3, 7, 9, False)
    small = geometric_median(gram_matrix(x * 1e-6))
    big = geometric_median(gram_matrix(x * 1e6))
    np.testing.assert_allclose(small.weights, big.weights, rtol=1e-6)
    capped = geometric_median(gram_matrix(x), max_iter=1)
    np.testing.assert_allclose(capped.weights, reference_geometric_median(x, max_iter=1)
                               ["weights"], rtol=1e-12)


def test_every_row_invalid():
    x = torch.full((5, 3), float("nan"), dtype=torch.float64)
    for d in (multi_krum(gram_matrix(x), f=1), geometric_median(gram_matrix(x))):
        assert not d.accepted.any() and d.anchor == -1 and d.weights.sum() == 0
    out = torch.ones(3, dtype=torch.float64)
    assert not coordinatewise(x, 1, out).accepted.any() and out.eq(0).all()


# -- the check of issue 15: a corrupted stack ------------------------------------------------


def corrupted_stack(seed: int, bad: list[int], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(64, generator=gen)
    x = base + 0.5 * torch.randn(8, 64, generator=gen)
    honest_mean = x[[i for i in range(8) if i not in bad]].mean(dim=0)
    for i in bad:
        if kind == "flip":
            x[i] = -10 * x[i]
        else:
            noise = torch.randn(64, generator=gen)
            x[i] = noise * (100 * x[i].norm() / noise.norm())
    return x, honest_mean


@pytest.mark.parametrize("kind", ["flip", "noise"])
@pytest.mark.parametrize("bad", [[3], [0, 5]])
def test_robust_rules_survive_a_corrupted_stack(kind, bad):
    for seed in range(5):
        x, honest = corrupted_stack(seed, bad, kind)
        cos = {}
        for rule, options in (("multi-krum", {"f": 2}), ("geometric-median", None)):
            res = gaf.filter_gradients(x, rule=rule, rule_options=options)
            cos[rule] = torch.nn.functional.cosine_similarity(res.grad, honest, dim=0)
        for trim in (None, 2):
            out = torch.empty(64)
            coordinatewise(x, trim, out)
            cos[f"coordinatewise {trim}"] = torch.nn.functional.cosine_similarity(
                out, honest, dim=0)
        mean_cos = torch.nn.functional.cosine_similarity(x.mean(dim=0), honest, dim=0)
        assert all(c > 0.9 for c in cos.values()), (seed, cos)
        assert mean_cos < 0.9, (seed, mean_cos)


# -- through the registry: filter_gradients, the trainer, the one-pass path ---------------


def test_rules_through_filter_gradients_match_the_pure_functions():
    x = random_rows(5, 9, 23, invalid=True)
    for rule, options, fn in (("multi-krum", {"f": 2, "m": 3}, multi_krum),
                              ("geometric-median", {"nu": 1e-2}, geometric_median)):
        res = gaf.filter_gradients(x, rule=rule, rule_options=options)
        d = fn(gram_matrix(x), **options)
        assert res.accepted.tolist() == d.accepted.tolist() and res.anchor == d.anchor
        assert torch.equal(res.grad, direction(x, d))
        assert res.num_invalid == 2 and not res.skipped and res.rule == rule
    # Krum keeps one row: a step, not a skip.
    krum = gaf.filter_gradients(x, rule="multi-krum", rule_options={"f": 1, "m": 1})
    assert krum.num_accepted == 1 and not krum.skipped
    with pytest.raises(ValueError, match="takes no option 'k'; its options are f, m"):
        gaf.filter_gradients(x, rule="multi-krum", rule_options={"k": 2})
    with pytest.raises(ValueError, match="blind controls"):
        gaf.filter_gradients(x, rule="geometric-median", verdicts=np.ones(9, dtype=bool))
    with pytest.raises(ValueError, match="needs the Gram matrix"):
        gaf.filter_gradients(x, rule="multi-krum", measure="sign")


@pytest.mark.parametrize("micro_gradients", ["sequential", "one-pass"])
def test_trainer_with_a_robust_rule_ignores_a_scaled_micro_batch(micro_gradients):
    from gaf.faults import FaultInjector

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = gaf.GAFTrainer(model, opt, torch.nn.functional.cross_entropy, 6,
                             rule="multi-krum", rule_options={"f": 1},
                             micro_gradients=micro_gradients)
    hook = None
    if micro_gradients == "sequential":
        hook = FaultInjector.make("scale", [2], scale=-50.0).gradient_hook(
            model.parameters(), 6)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(24, 6, generator=gen), torch.randint(0, 3, (24,), generator=gen)
        out = trainer.step(x, y, on_micro_gradient=hook)
        assert out.result.num_accepted == 5 and not out.skipped
        if hook is not None:
            assert not out.result.accepted[2]


def test_trainer_refuses_too_few_rows_for_krum_at_construction():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy
    with pytest.raises(ValueError, match=r"more than 2f \+ 2 = 4 micro-gradients, got M = 4"):
        gaf.GAFTrainer(model, opt, loss, 4, rule="multi-krum")
    gaf.GAFTrainer(model, opt, loss, 5, rule="multi-krum")  # M = 5 > 4
