"""GAFTrainer's hook between backward and collect, its plain-averaging path, and M = 1."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

import gaf


def setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)


def data(steps, n=24, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=gen), torch.randint(0, 4, (n,), generator=gen))
            for _ in range(steps)]


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()])


@pytest.mark.parametrize("mode", ["streaming", "stacked"])
def test_hook_sees_each_micro_gradient_before_the_filter(mode):
    model, opt = setup()
    probe = copy.deepcopy(model)
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, 3, tau=2.0, mode=mode)
    x, y = data(1)[0]
    seen = {}
    trainer.step(x, y, on_micro_gradient=lambda k: seen.setdefault(k, flat_grad(model)))
    assert sorted(seen) == [0, 1, 2]
    for k, (xs, ys) in enumerate(zip(x.tensor_split(3), y.tensor_split(3), strict=True)):
        probe.zero_grad(set_to_none=True)
        F.cross_entropy(probe(xs), ys).backward()
        torch.testing.assert_close(seen[k], flat_grad(probe), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["streaming", "stacked"])
def test_hook_can_corrupt_a_micro_gradient(mode):
    model, opt = setup()
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, 4, tau=2.0, mode=mode)

    def poison(k):
        if k == 2:
            for p in model.parameters():
                p.grad.fill_(float("nan"))

    x, y = data(1)[0]
    out = trainer.step(x, y, on_micro_gradient=poison)
    assert out.result.accepted.tolist() == [True, True, False, True]
    assert out.result.num_nonfinite == 1 and not out.skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def experiment_average_step(model, opt, params, x, y, m, max_grad_norm):
    """The experiment loop's averaging step as it is written there."""
    opt.zero_grad(set_to_none=True)
    for xs, ys in zip(x.view(m, -1, *x.shape[1:]), y.view(m, -1), strict=True):
        loss = F.cross_entropy(model(xs), ys)
        (loss / m).backward()
    nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()


def test_average_path_is_plain_accumulation_bit_for_bit():
    ref_model, ref_opt = setup()
    model, opt = setup()
    params = [p for p in ref_model.parameters() if p.requires_grad]
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, 4, max_grad_norm=0.5, average=True)
    calls = []
    for x, y in data(20):
        experiment_average_step(ref_model, ref_opt, params, x, y, 4, 0.5)
        out = trainer.step(x, y, on_micro_gradient=calls.append)
        assert not out.skipped and not out.result.skipped
        assert out.result.accepted.tolist() == [True] * 4 and out.result.num_accepted == 4
    assert calls == [0, 1, 2, 3] * 20
    for p, q in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert trainer.stats.steps == 20 and trainer.stats.skipped_steps == 0
    assert trainer.stats.acceptance_rate == 1.0
    state = trainer.state_dict()
    other = gaf.GAFTrainer(model, opt, F.cross_entropy, 4, average=True)
    other.load_state_dict(state)
    assert other.stats.steps == 20


def test_average_hook_sees_the_accumulated_gradient():
    model, opt = setup()
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, 2, average=True)
    x, y = data(1)[0]
    seen = []
    probe = copy.deepcopy(model)
    trainer.step(x, y, on_micro_gradient=lambda k: seen.append(flat_grad(model)))
    probe.zero_grad(set_to_none=True)
    (F.cross_entropy(probe(x[:12]), y[:12]) / 2).backward()
    torch.testing.assert_close(seen[0], flat_grad(probe), rtol=0, atol=0)


def test_one_micro_batch_on_one_device_is_refused():
    model, opt = setup()
    with pytest.raises(ValueError, match="num_micro_batches=1 on one device"):
        gaf.GAFTrainer(model, opt, F.cross_entropy, 1)
    with pytest.raises(ValueError, match="num_micro_batches=1 on one device"):
        gaf.GAFTrainer(model, opt, F.cross_entropy, 1, mode="stacked", rule="consensus")
    # Plain steps with one micro-batch are ordinary SGD.
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, 1, average=True)
    assert not trainer.step(*data(1)[0]).skipped


def test_average_takes_no_filter_arguments():
    model, opt = setup()
    with pytest.raises(ValueError, match="filters nothing"):
        gaf.GAFTrainer(model, opt, F.cross_entropy, 2, average=True,
                       control=gaf.RandomSkip(0.5))
