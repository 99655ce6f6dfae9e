"""The one-pass mode in use: GAFTrainer runs, rows for other collectors, distributed.

Runs and collectors fed from one pass against the same runs and collectors fed one
micro-batch at a time; helpers come from ``test_one_pass``.
"""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gaf
from gaf import OnePassFilter
from test_one_pass import DT, MODELS, sequential, setup, tau_for


@pytest.fixture(autouse=True)
def one_thread():
    """Hundreds of tiny passes: a second thread only adds synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trainer_run(micro_gradients, model_name, steps, seed=0):
    torch.manual_seed(seed)
    if model_name == "mlp":
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).to(DT)
        data = torch.randn(512, 8, dtype=DT)
    else:
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(),
                              nn.Flatten(), nn.Linear(4 * 4 * 4, 4)).to(DT)
        data = torch.randn(512, 1, 6, 6, dtype=DT)
    teacher = torch.randn(data[0].numel(), 4, dtype=DT, generator=torch.Generator().manual_seed(1))
    labels = (data.flatten(1) @ teacher).argmax(1)
    noisy = labels.clone()
    flip = torch.rand(512, generator=torch.Generator().manual_seed(2)) < 0.2
    noisy[flip] = torch.randint(0, 4, (int(flip.sum()),),
                                generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, 4, tau=0.99,
                             micro_gradients=micro_gradients)
    order = torch.randperm(512, generator=torch.Generator().manual_seed(4))
    skipped = []
    for step in range(steps):
        idx = order[(step * 32) % 512:][:32]
        skipped.append(trainer.step(data[idx], noisy[idx]).skipped)
    with torch.no_grad():
        accuracy = float((model(data).argmax(1) == labels).double().mean())
    return accuracy, skipped, [p.detach().clone() for p in model.parameters()], trainer


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_training_run_matches_sequential(model_name):
    acc_seq, skips_seq, params_seq, _ = trainer_run("sequential", model_name, 300)
    acc_one, skips_one, params_one, trainer = trainer_run("one-pass", model_name, 300)
    assert skips_one == skips_seq
    assert 0 < sum(skips_seq) < 300  # the filter did decide something
    assert acc_one == acc_seq and acc_one > 0.5
    for a, b in zip(params_seq, params_one, strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
    assert trainer.stats.steps == 300
    assert trainer.state_dict()["collector"]["mode"] == "one-pass"


def test_trainer_refuses_one_pass_with_collector_options():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="takes no collector, mode or measure"):
        gaf.GAFTrainer(model, opt, F.cross_entropy, 2, micro_gradients="one-pass", mode="stacked")
    with pytest.raises(ValueError, match="unknown micro_gradients"):
        gaf.GAFTrainer(model, opt, F.cross_entropy, 2, micro_gradients="vmap")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_micro_gradient_rows_equal_the_stacked_rows(name):
    m = 5
    model, x, y = setup(name, m, seed=2)
    _, rows, _ = sequential(copy.deepcopy(model), x, y, m, 2.0, "mean")
    engine = OnePassFilter(model)
    got, losses = engine.micro_gradients(x, y, F.cross_entropy, m)
    assert torch.allclose(got, rows, rtol=1e-10, atol=1e-12 * float(rows.abs().max()))
    assert losses.shape == (m,)
    assert all(p.grad is None for p in model.parameters())  # .grad untouched


def test_collect_one_pass_feeds_any_collector():
    m = 4
    model, x, y = setup("conv2d_groupnorm", m, seed=4)
    _, rows, _ = sequential(copy.deepcopy(model), x, y, m, 2.0, "anchor")
    tau = tau_for(rows, m)
    ref, _, ref_grads = sequential(copy.deepcopy(model), x, y, m, tau, "anchor")
    collector = gaf.GradientCollector(model.parameters(), tau=tau, rule="anchor", mode="stacked")
    gaf.collect_one_pass(collector, model, F.cross_entropy, x, y, m)
    res = collector.finish()
    assert torch.equal(res.accepted, ref.accepted)
    for a, p in zip(ref_grads, model.parameters(), strict=True):
        assert torch.allclose(a, p.grad, rtol=1e-10, atol=1e-14)


def _distributed_one_pass(rank, world_size):
    """Each rank's m rows from one pass feed the sharded protocol; the decision and the
    direction equal those of the same ranks feeding it one micro-batch at a time."""
    from gaf.distributed import DistributedGradientCollector

    m = 3
    model, _, _ = setup("mlp", m, seed=0)  # same parameters on every rank
    gen = torch.Generator().manual_seed(10 + rank)
    x, y = torch.randn(4 * m, 7, generator=gen, dtype=DT), torch.randint(0, 3, (4 * m,),
                                                                         generator=gen)
    results = []
    for one in (False, True):
        replica = copy.deepcopy(model)
        collector = DistributedGradientCollector(replica.parameters(), tau=1.0, rule="mean")
        if one:
            gaf.collect_one_pass(collector, replica, F.cross_entropy, x, y, m)
        else:
            for xs, ys in zip(x.tensor_split(m), y.tensor_split(m), strict=True):
                F.cross_entropy(replica(xs), ys).backward()
                collector.collect()
        results.append((collector.finish(), [p.grad.clone() for p in replica.parameters()]))
    (seq, seq_grads), (one, one_grads) = results
    assert seq.num_micro_batches == one.num_micro_batches == world_size * m
    assert torch.equal(seq.accepted, one.accepted)
    for a, b in zip(seq_grads, one_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_distributed_rows_from_one_pass(tmp_path):
    from test_distributed import spawn

    spawn(_distributed_one_pass, 2, tmp_path)


def test_trainer_with_grad_scaler_and_adaptive_threshold_matches_sequential():
    """Scaled losses (the scaler's factor reaches δ, hence G and the direction, as it
    reaches the sequential rows) and a threshold that adapts to the observed distances."""
    finals = []
    for micro_gradients in ("sequential", "one-pass"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, 4,
                                 tau=gaf.make_threshold("quantile", target_acceptance=0.6,
                                                        window=16, initial=0.99),
                                 scaler=scaler, micro_gradients=micro_gradients)
        gen = torch.Generator().manual_seed(5)
        skips = []
        for _ in range(20):
            x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
            skips.append(trainer.step(x, y).skipped)
        finals.append((skips, [p.detach().clone() for p in model.parameters()]))
    (skips_seq, seq), (skips_one, one) = finals
    assert skips_one == skips_seq and 0 < sum(skips_seq) < 20
    for a, b in zip(seq, one, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
