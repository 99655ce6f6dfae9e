"""One filter spec for every front end (issue 18): each takes ``spec=``, keywords are sugar,
and what the spec says reaches the backend that filters, on every path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

import gaf
from gaf.micrograds import (
    AveragingBackend,
    Backend,
    OnePassBackend,
    StackedBackend,
    StreamingBackend,
)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def krum_batch(m: int = 8, per: int = 4, seed: int = 0):
    """A batch whose micro-batches differ: two of them get shuffled labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m * per, 6, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    y[: 2 * per] = torch.randint(0, 3, (2 * per,), generator=gen)
    return x, y


def accepted_rows(micro_gradients: str, spec: gaf.FilterSpec, mode: str = "auto"):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, 8, spec=spec, mode=mode,
                             micro_gradients=micro_gradients)
    out = trainer.step(*krum_batch())
    return out.result.accepted.tolist(), [p.detach().clone() for p in model.parameters()]


def test_one_pass_keeps_the_sequential_rows_under_multi_krum_options():
    # On main, OnePassFilter never received rule_options: f defaulted to 1 and the one-pass
    # path kept 7 of 8 micro-batches where the sequential path kept 6.
    spec = gaf.FilterSpec(rule="multi-krum", rule_options={"f": 2})
    seq, seq_params = accepted_rows("sequential", spec)
    one, one_params = accepted_rows("one-pass", spec)
    assert sum(seq) == 6  # multi-krum keeps M - f rows
    assert one == seq
    for a, b in zip(seq_params, one_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The keyword sugar reaches the one-pass backend the same way.
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, 8, rule="multi-krum",
                             rule_options={"f": 2}, micro_gradients="one-pass")
    assert trainer.step(*krum_batch()).result.accepted.tolist() == seq


def test_every_single_device_front_end_takes_a_spec():
    spec = gaf.FilterSpec(tau=0.9, rule="anchor")
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fronts = [
        gaf.GradientCollector(model.parameters(), spec),
        gaf.GAFTrainer(model, opt, F.cross_entropy, 4, spec=spec).collector,
        gaf.GAFTrainer(model, opt, F.cross_entropy, 4, spec=spec,
                       micro_gradients="one-pass").collector,
        gaf.OnePassFilter(model, spec=spec),
    ]
    for collector in fronts:
        assert collector.spec is spec and collector.rule == "anchor" and collector.tau == 0.9
    # Keywords build the same spec; both at once is refused, naming the keyword.
    sugar = gaf.GradientCollector(model.parameters(), tau=0.9, rule="anchor")
    assert sugar.spec == spec
    with pytest.raises(ValueError, match="both spec= and tau="):
        gaf.GAFTrainer(model, opt, F.cross_entropy, 4, spec=spec, tau=0.5)
    with pytest.raises(ValueError, match="both spec= and rule="):
        gaf.OnePassFilter(model, spec=spec, rule="halving")


def test_spec_errors_come_at_construction_on_every_front_end():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    builders = {
        "collector": lambda **kw: gaf.GradientCollector(model.parameters(), **kw),
        "trainer": lambda **kw: gaf.GAFTrainer(model, opt, F.cross_entropy, 4, **kw),
        "one-pass trainer": lambda **kw: gaf.GAFTrainer(
            model, opt, F.cross_entropy, 4, micro_gradients="one-pass", **kw),
        "one-pass filter": lambda **kw: gaf.OnePassFilter(model, **kw),
    }
    for name, build in builders.items():
        with pytest.raises(TypeError, match="rule_options"):
            build(rule="multi-krum", rule_options=1)
        with pytest.raises(ValueError, match="f"):  # checked against the rule, not at step 1
            build(rule="multi-krum", rule_options={"f": -1})
        with pytest.raises(TypeError, match="unknown filter option"):
            build(threshold=0.5)
        assert name


def test_every_backend_implements_the_protocol():
    model = mlp()
    flat = gaf.FlatGradients(model.parameters())
    spec = gaf.FilterSpec()
    backends = [StreamingBackend(flat, spec), StackedBackend(flat, spec),
                OnePassBackend(model, flat, spec), AveragingBackend(flat)]
    for backend in backends:
        assert isinstance(backend, Backend), type(backend).__name__
    # A backend refuses the call that is not its way of taking micro-gradients, clearly.
    with pytest.raises(TypeError, match="one pass"):
        backends[2].collect(0, None)
    with pytest.raises(TypeError, match="after each micro-batch's backward"):
        backends[0].collect_batch(None)


def test_average_mode_is_a_backend_and_the_flag_a_deprecated_alias():
    x, y = krum_batch()
    models = [mlp(), mlp()]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    new = gaf.GAFTrainer(models[0], opts[0], F.cross_entropy, 4, mode="average")
    with pytest.warns(DeprecationWarning, match="mode='average'"):
        old = gaf.GAFTrainer(models[1], opts[1], F.cross_entropy, 4, average=True)
    assert new.collector.mode == old.collector.mode == "average" and new.average
    for trainer in (new, old):
        out = trainer.step(x, y)
        assert not out.skipped and out.result.rule == "average"
    for p, q in zip(*(m.parameters() for m in models), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="filters nothing"):
        gaf.GAFTrainer(models[0], opts[0], F.cross_entropy, 4, mode="average", tau=0.5)


def test_integrations_take_spec_with_rule_options_and_control():
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    from gaf.integrations.lightning import GAFCallback
    from gaf.integrations.transformers import GAFHFTrainer

    spec = gaf.FilterSpec(rule="multi-krum", rule_options={"f": 1})
    assert GAFCallback(spec).spec is spec
    assert GAFCallback(rule="multi-krum", rule_options={"f": 1}).spec == spec
    control = gaf.RandomSkip(0.5, seed=3)
    assert GAFCallback(control=control).spec.control is control
    # Wrong options fail when the callback is built, not when fitting starts.
    with pytest.raises(TypeError, match="rule_options"):
        GAFCallback(rule="multi-krum", rule_options=1)
    with pytest.raises(ValueError, match="both spec= and tau="):
        GAFCallback(spec, tau=0.5)
    # The HF trainer takes the filter's keywords out before Trainer sees them.
    with pytest.raises(TypeError, match="rule_options"):
        GAFHFTrainer(model=mlp(), rule="multi-krum", rule_options=1)


def test_accelerate_helper_filters_by_the_spec_it_is_given():
    accelerate = pytest.importorskip("accelerate")
    from gaf.integrations.accelerate import GAFAccumulator

    accelerator = accelerate.Accelerator(gradient_accumulation_steps=4, cpu=True)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reference = copy.deepcopy(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    spec = gaf.FilterSpec(rule="multi-krum", rule_options={"f": 0, "m": 2})
    gaf_step = GAFAccumulator(accelerator, model, optimizer, spec)
    assert gaf_step.collector.spec is spec and gaf_step.collector.mode == "stacked"
    x, y = krum_batch(m=4)
    for xb, yb in zip(x.split(4), y.split(4), strict=True):
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(xb), yb))
            gaf_step.after_backward()
            optimizer.step()
            optimizer.zero_grad()
    rows = []
    for xb, yb in zip(x.split(4), y.split(4), strict=True):
        reference.zero_grad()
        F.cross_entropy(reference(xb), yb).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in reference.parameters()]))
    expected = gaf.filter_gradients(torch.stack(rows), rule="multi-krum",
                                    rule_options={"f": 0, "m": 2})
    assert gaf_step.last_outcome.result.accepted.tolist() == expected.accepted.tolist()
    assert expected.num_accepted == 2  # m = 2 kept (before, the helper took no options)


def _distributed_spec_checks(rank: int, n: int) -> None:
    from gaf.distributed import DistributedGAFTrainer, DistributedGradientCollector

    spec = gaf.FilterSpec(rule="multi-krum", rule_options={"f": 1, "m": 3})
    torch.manual_seed(0)
    base = mlp()
    model, one_model = copy.deepcopy(base), copy.deepcopy(base)
    trainer = DistributedGAFTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                    F.cross_entropy, 4, spec)
    assert trainer.collector.spec is spec
    one = gaf.GAFTrainer(one_model, torch.optim.SGD(one_model.parameters(), lr=0.1),
                         F.cross_entropy, 4 * n, spec=spec, mode="stacked")
    x, y = krum_batch(m=4 * n, per=3, seed=5)
    per_rank = x.shape[0] // n
    out = trainer.step(x[rank * per_rank:(rank + 1) * per_rank],
                       y[rank * per_rank:(rank + 1) * per_rank])
    ref = one.step(x, y)
    assert out.result.accepted.tolist() == ref.result.accepted.tolist()
    assert out.result.num_accepted == 3  # the spec's m, over both ranks' rows
    for p, q in zip(model.parameters(), one_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # Keyword sugar, and the spec's errors before any collective.
    sugar = DistributedGradientCollector(mlp().parameters(), rule="multi-krum",
                                         rule_options={"f": 1, "m": 3})
    assert sugar.spec == spec
    with pytest.raises(ValueError, match="both spec= and tau="):
        DistributedGradientCollector(mlp().parameters(), spec, tau=0.5)
    with pytest.raises(ValueError, match="not implemented across ranks"):
        DistributedGradientCollector(mlp().parameters(), gaf.FilterSpec(measure="sign"))


def test_distributed_front_ends_take_a_spec(tmp_path):
    from test_distributed import spawn

    spawn(_distributed_spec_checks, 2, tmp_path)
