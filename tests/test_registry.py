"""The rule registry: a rule added in one place runs through every front end, with options."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

import gaf
from gaf.core import REGISTRY, RULES, Decision, Rule, get_rule, register_rule
from gaf.core.rules import agrees


def keep_first(oracle, tau, valid, verdicts, *, count=2):
    """Test rule: the first ``count`` valid rows whose distance to row 0's direction passes."""
    m = len(valid)
    accepted = np.zeros(m, dtype=bool)
    distances = np.full(m, 2.0)
    first = int(np.argmax(valid))
    one_hot = np.eye(m)[first]
    for k in np.flatnonzero(valid):
        distances[k] = 0.0 if k == first else oracle.to_sum(one_hot, k)
        if accepted.sum() < count and (k == first or agrees(distances[k], tau, verdicts, k)):
            accepted[k] = True
    return Decision(accepted, accepted / accepted.sum(), distances, first, valid)


@pytest.fixture
def registered():
    rule = register_rule(Rule("keep-first", keep_first, "test rule: the first rows that agree"))
    try:
        yield rule
    finally:
        del REGISTRY["keep-first"]


def test_registered_rule_runs_with_options(registered):
    x = torch.tensor([[1.0, 0], [1, 0.1], [1, 0.2], [1, -0.1]])
    r = gaf.filter_gradients(x, 0.5, "keep-first")
    assert r.accepted.tolist() == [True, True, False, False]
    r = gaf.filter_gradients(x, 0.5, "keep-first", rule_options={"count": 3})
    assert r.accepted.tolist() == [True, True, True, False]
    with pytest.raises(ValueError, match="takes no option 'size'; its options are count"):
        gaf.filter_gradients(x, 0.5, "keep-first", rule_options={"size": 3})
    with pytest.raises(ValueError, match="takes no option"):
        gaf.filter_gradients(x, 0.5, "mean", rule_options={"count": 3})


def test_registered_rule_through_the_trainer(registered):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, 4, tau=2.0, rule="keep-first",
                             rule_options={"count": 3})
    assert trainer.collector.mode == "stacked"  # not a streaming fold
    out = trainer.step(torch.randn(16, 4), torch.randint(0, 3, (16,)))
    assert out.result.num_accepted == 3 and out.result.rule == "keep-first"
    with pytest.raises(ValueError, match="takes no option"):
        gaf.GradientCollector(model.parameters(), rule="keep-first", rule_options={"x": 1})


def test_registry_lists_the_built_in_rules():
    assert RULES == ("mean", "halving", "anchor", "neighbours", "consensus")
    assert [n for n in RULES if get_rule(n).streaming] == ["mean", "halving"]
    assert not get_rule("consensus").anchored
    with pytest.raises(ValueError, match="already registered"):
        register_rule(Rule("mean", keep_first, "again"))
    with pytest.raises(ValueError, match="unknown rule 'median'"):
        get_rule("median")


def test_distributed_front_ends_name_the_measures_they_lack():
    from gaf.distributed import DistributedGradientCollector

    with pytest.raises(ValueError, match="not implemented across ranks"):
        DistributedGradientCollector(nn.Linear(2, 2).parameters(), measure="sign")
