"""Fault injection: each kind does what it says, seeded, identically on a stack and on
parameter gradients; robust rules survive what averaging does not."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gaf
from gaf.faults import FAULT_KINDS, FaultInjector, FaultSpec, wrong_labels


def stack(seed: int = 0, m: int = 4, p: int = 10) -> torch.Tensor:
    return torch.randn(m, p, generator=torch.Generator().manual_seed(seed))


def test_fault_kinds_on_a_stack():
    x = stack()
    for kind, check in (
        ("sign-flip", lambda new, old: torch.equal(new, -old)),
        ("scale", lambda new, old: torch.allclose(new, -10 * old)),
        ("noise", lambda new, old: math.isclose(new.norm(), 100 * old.norm(), rel_tol=1e-5)),
        ("nonfinite", lambda new, old: new.isnan().all()),
    ):
        y = x.clone()
        hit = FaultInjector.make(kind, [1, 3]).corrupt_rows(y)
        assert hit == [1, 3]
        assert torch.equal(y[[0, 2]], x[[0, 2]]), kind
        assert check(y[1], x[1]) and check(y[3], x[3]), kind
    inf = x.clone()
    FaultInjector.make("nonfinite", [0], value=float("inf")).corrupt_rows(inf)
    assert inf[0].isinf().all()


def test_stale_row_replays_the_previous_step():
    injector = FaultInjector.make("stale", [2])
    first, second = stack(0), stack(1)
    a = first.clone()
    assert injector.corrupt_rows(a) == []  # nothing older to replay on the first step
    assert torch.equal(a, first)
    b = second.clone()
    assert injector.corrupt_rows(b) == [2]
    assert torch.equal(b[2], first[2]) and torch.equal(b[:2], second[:2])
    assert injector.injected == 1


def test_noise_is_seeded_per_step_and_row_and_rows_are_global():
    x = stack(m=4)

    def noisy(seed, rows, first_row=0, part=x):
        y = part.clone()
        FaultInjector.make("noise", rows, seed=seed).corrupt_rows(y, first_row=first_row)
        return y

    assert torch.equal(noisy(0, [1]), noisy(0, [1]))
    assert not torch.equal(noisy(0, [1]), noisy(1, [1]))
    # Rows 2-3 on a "rank" with first_row = 2 are corrupted exactly as in the whole stack.
    assert torch.equal(noisy(0, [3])[2:], noisy(0, [3], first_row=2, part=x[2:]))


def test_gradient_hook_matches_the_stacked_rows():
    model = nn.Linear(3, 2)
    params = list(model.parameters())
    injector = FaultInjector.make("noise", [1], seed=5)
    reference = FaultInjector.make("noise", [1], seed=5)
    hook = injector.gradient_hook(params, num_rows=2)
    for step in range(2):
        rows = []
        for k in range(2):
            model.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            clean = torch.cat([p.grad.flatten() for p in params])
            hook(k)
            rows.append((clean, torch.cat([p.grad.flatten() for p in params])))
        stacked = torch.stack([c for c, _ in rows])
        reference.corrupt_rows(stacked)
        assert torch.allclose(stacked, torch.stack([h for _, h in rows])), step
    assert injector.step == 2 and injector.injected == 2


def test_wrong_labels_are_all_wrong_and_only_on_faulty_micro_batches():
    y = torch.arange(12) % 5
    injector = FaultInjector.make("wrong-labels", [1])
    out = injector.corrupt_labels(y, num_micro_batches=3, num_classes=5)
    assert torch.equal(out[:4], y[:4]) and torch.equal(out[8:], y[8:])
    assert (out[4:8] != y[4:8]).all() and ((out >= 0) & (out < 5)).all()
    assert (wrong_labels(y, 5) != y).all()
    # Gradient kinds leave labels alone; the label kind leaves gradients alone.
    assert FaultInjector.make("scale", [1]).corrupt_labels(y, 3, 5) is y
    x = stack()
    assert FaultInjector.make("wrong-labels", [0]).corrupt_rows(x.clone()) == []


def test_spec_validation_and_record():
    with pytest.raises(ValueError, match="unknown fault kind 'bitrot'"):
        FaultSpec("bitrot", (0,))
    with pytest.raises(ValueError, match="repeat"):
        FaultSpec("scale", (1, 1))
    with pytest.raises(ValueError, match="inf or NaN"):
        FaultSpec("nonfinite", (0,), value=1.0)
    with pytest.raises(ValueError, match="num_rows"):
        FaultInjector.make("scale", [0]).gradient_hook([], num_rows=0)
    record = FaultSpec("nonfinite", (0, 2), seed=3).to_dict()
    assert record["rows"] == [0, 2] and record["value"] == "nan" and record["seed"] == 3
    assert set(FAULT_KINDS) >= {"sign-flip", "scale", "noise", "nonfinite", "stale",
                                "wrong-labels"}


def test_gradient_hook_on_accumulated_gradients_corrupts_one_micro_gradient():
    # Under plain accumulation .grad holds Σ_{i<=k} g_i; the hook must corrupt g_k alone.
    model = nn.Linear(3, 2)
    params = list(model.parameters())
    batches = [torch.randn(4, 3, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    grads = []
    for xb in batches:
        model.zero_grad()
        model(xb).sum().backward()
        grads.append([p.grad.clone() for p in params])
    hook = FaultInjector.make("scale", [1], scale=-10.0).gradient_hook(params, num_rows=3,
                                                                        accumulated=True)
    model.zero_grad()
    for k, xb in enumerate(batches):
        model(xb).sum().backward()
        hook(k)
    for j, p in enumerate(params):
        expected = grads[0][j] - 10 * grads[1][j] + grads[2][j]
        torch.testing.assert_close(p.grad, expected)


def _trainer_run(average: bool, injector: FaultInjector, steps: int = 3):
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # Plain averaging takes no filter options (it would ignore them): tau only for GAF.
    trainer = gaf.GAFTrainer(model, opt, nn.functional.cross_entropy, 4,
                             **({"mode": "average"} if average else {"tau": 2.0}))
    hook = injector.gradient_hook(model.parameters(), 4, accumulated=average)
    gen = torch.Generator().manual_seed(1)
    results = []
    for _ in range(steps):
        x, y = torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        results.append(trainer.step(x, y, on_micro_gradient=hook))
    return model, results


def test_fault_hook_through_gaf_trainer():
    # A non-finite micro-gradient injected in the step is rejected by the filter and the
    # parameters stay finite; plain averaging takes it in.
    model, results = _trainer_run(False, FaultInjector.make("nonfinite", [2]))
    assert all(r.result.num_nonfinite == 1 and not r.skipped for r in results)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model, _ = _trainer_run(True, FaultInjector.make("nonfinite", [2]))
    assert not all(torch.isfinite(p).all() for p in model.parameters())
    # At tau = 2 the filter takes the plain mean of the rows, so with a scale fault the
    # filtered run and the averaging run (hook on the accumulated gradient) agree.
    filtered, _ = _trainer_run(False, FaultInjector.make("scale", [1]))
    averaged, _ = _trainer_run(True, FaultInjector.make("scale", [1]))
    for p, q in zip(filtered.parameters(), averaged.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
