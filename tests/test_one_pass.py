"""The one-pass mode against the sequential collector over the same micro-batches.

Every supported layer kind, every rule, M = 2..16, in float64: the Gram matrix, the
decision and the direction written into .grad must equal those of the stacked collector
fed one micro-batch at a time (the reference).
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gaf
import gaf.micrograds.one_pass.linear
from gaf import OnePassFilter
from gaf.core import RULES, pairwise_distances
from gaflab.models import build_model

DT = torch.float64
MS = (2, 3, 5, 8, 16)


@pytest.fixture(autouse=True)
def one_thread():
    """Many tiny passes: a second thread only adds synchronisation (and, on a loaded
    machine, waits for a core: the tests ran 30 times slower with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Tokens(nn.Module):
    """Embedding → per-position Linear (3-D rows) → LayerNorm → mean → Linear."""

    def __init__(self, vocab=11, dim=6, padding_idx=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.embed(tokens)))
        return self.head(self.norm(h).mean(1))


class Shared(nn.Module):
    """One Linear called twice in a forward: its micro-gradients sum both calls."""

    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def conv2d_net(norm):
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), norm, nn.ReLU(inplace=True),
                         nn.Conv2d(4, 3, 3, stride=2, padding_mode="reflect", padding=1),
                         nn.Flatten(), nn.Linear(3 * 3 * 3, 3))


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(7, 9), nn.ReLU(inplace=True), nn.Linear(9, 3)),
            lambda b: torch.randn(b, 7)),
    "conv2d_groupnorm": (lambda: conv2d_net(nn.GroupNorm(2, 4)), lambda b: torch.randn(b, 2, 5, 5)),
    "conv2d_batchnorm_train": (lambda: conv2d_net(nn.BatchNorm2d(4)),
                               lambda b: torch.randn(b, 2, 5, 5)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3, padding="same"), nn.Tanh(),
                                     nn.Conv1d(4, 2, 2, stride=2, dilation=1, groups=2),
                                     nn.BatchNorm1d(2), nn.Flatten(), nn.Linear(2 * 4, 3)),
               lambda b: torch.randn(b, 3, 8)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 3, 2, padding=1, dilation=2), nn.Tanh(),
                                     nn.Flatten(), nn.Linear(3 * 3 * 3 * 3, 3)),
               lambda b: torch.randn(b, 2, 3, 3, 3)),
    "tokens": (Tokens, lambda b: torch.randint(0, 11, (b, 4))),
    "tokens_padding": (lambda: Tokens(padding_idx=0), lambda b: torch.randint(0, 11, (b, 4))),
    "shared_linear": (Shared, lambda b: torch.randn(b, 5)),
}


def setup(name, m, seed=0, batch=None):
    torch.manual_seed(seed)
    build, draw = MODELS[name]
    model = build().to(DT)
    b = batch or 2 * m + 1  # not divisible by M: unequal micro-batches
    x = draw(b)
    x = x.to(DT) if x.is_floating_point() else x
    return model, x, torch.randint(0, 3, (b,))


def sequential(model, x, y, m, tau, rule):
    """The reference: the stacked collector, one forward/backward per micro-batch."""
    collector = gaf.GradientCollector(model.parameters(), tau=tau, rule=rule, mode="stacked")
    for xs, ys in zip(x.tensor_split(m), y.tensor_split(m), strict=True):
        F.cross_entropy(model(xs), ys).backward()
        collector.collect()
    rows = collector.backend.rows[:m].clone()
    result = collector.finish()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return result, rows, grads


def one_pass(model, x, y, m, tau, rule, **kwargs):
    result = gaf.one_pass_filter(model, F.cross_entropy, x, y, m, tau=tau, rule=rule, **kwargs)
    return result, [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def tau_for(rows, m):
    """A threshold between two pairwise distances near their median, so decisions are not
    trivial and no distance lies on the threshold (M = 2: just above or below, by M)."""
    g = (rows @ rows.T).numpy()
    d = np.sort(pairwise_distances(g)[np.triu_indices(len(g), 1)])
    if len(d) == 1:
        return float(d[0] + (1e-3 if m % 2 else -1e-3))
    k = len(d) // 2
    return float((d[k - 1] + d[k]) / 2)


def assert_same(ref, rows, ref_grads, res, grads):
    gram = rows @ rows.T
    scale = gram.abs().max()
    assert torch.allclose(res.extra["gram"], gram, rtol=0, atol=1e-12 * scale)
    assert torch.equal(res.accepted, ref.accepted)
    assert torch.allclose(res.weights, ref.weights, rtol=0, atol=1e-15)
    assert res.skipped == ref.skipped
    if ref.skipped:
        assert all(g is None for g in grads)
        return
    for a, b in zip(ref_grads, grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12 * float(rows.abs().max()))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("rule", RULES)
def test_same_decisions_and_direction_as_sequential(name, rule):
    for m in MS:
        model, x, y = setup(name, m, seed=m)
        ref_model = copy.deepcopy(model)
        _, rows, _ = sequential(copy.deepcopy(model), x, y, m, 2.0, rule)
        tau = tau_for(rows, m)
        ref, rows, ref_grads = sequential(ref_model, x, y, m, tau, rule)
        res, grads = one_pass(model, x, y, m, tau, rule)
        assert_same(ref, rows, ref_grads, res, grads)
        for a, b in zip(ref_model.buffers(), model.buffers(), strict=True):
            assert torch.allclose(a.to(DT), b.to(DT), rtol=1e-12, atol=1e-12)  # ghost BN stats


@pytest.mark.parametrize("name", ["mlp", "conv2d_groupnorm", "conv1d", "conv3d", "tokens"])
@pytest.mark.parametrize("batch_per_micro", [1, 4, 20])
def test_every_path_agrees_with_sequential(name, batch_per_micro):
    """Equal micro-batches (the batched kernels) and no keep budget (recomputed weights:
    the kept plain sum corrected by the micro-batches off the most common weight)."""
    m = 4
    for budget in (0, None):
        for rule in RULES:
            model, x, y = setup(name, m, seed=3, batch=m * batch_per_micro)
            _, rows, _ = sequential(copy.deepcopy(model), x, y, m, 2.0, rule)
            for tau in (2.0, tau_for(rows, m)):
                ref, rows, ref_grads = sequential(copy.deepcopy(model), x, y, m, tau, rule)
                res, grads = one_pass(copy.deepcopy(model), x, y, m, tau, rule,
                                      keep_budget=budget)
                assert_same(ref, rows, ref_grads, res, grads)


@pytest.mark.parametrize(("layer", "m", "per_micro", "budget", "expected"), [
    (nn.Linear(64, 64), 2, 4, None, "ghost"),        # few rows, wide layer: R²(in+out) wins
    (nn.Linear(4, 3), 8, 4, None, "kept"),           # blocks smaller than the rows
    (nn.Linear(16, 16), 4, 4, 0, "recomputed"),      # blocks too big to keep, no budget
    (nn.Linear(16, 16), 4, 4, 10**6, "kept"),        # the same, within the budget
])
def test_linear_path_choice(layer, m, per_micro, budget, expected):
    torch.manual_seed(0)
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(layer.out_features, 3)).to(DT)
    x = torch.randn(m * per_micro, layer.in_features, dtype=DT)
    y = torch.randint(0, 3, (m * per_micro,))
    ref, rows, ref_grads = sequential(copy.deepcopy(model), x, y, m, 2.0, "mean")
    res, grads = one_pass(model, x, y, m, 2.0, "mean", keep_budget=budget)
    assert res.extra["plan"]["0.weight"] == expected
    assert_same(ref, rows, ref_grads, res, grads)


def test_recomputed_linear_in_chunks_of_output_features(monkeypatch):
    # 3 features a chunk
    monkeypatch.setattr(gaf.micrograds.one_pass.linear, "CHUNK_NUMBERS", 3 * 4 * 16)
    for rule in RULES:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).to(DT)
        x, y = torch.randn(16, 16, dtype=DT), torch.randint(0, 3, (16,))
        _, rows, _ = sequential(copy.deepcopy(model), x, y, 4, 2.0, rule)
        tau = tau_for(rows, 4)
        ref, rows, ref_grads = sequential(copy.deepcopy(model), x, y, 4, tau, rule)
        res, grads = one_pass(model, x, y, 4, tau, rule, keep_budget=0)
        assert res.extra["plan"]["0.weight"] == "recomputed"
        assert_same(ref, rows, ref_grads, res, grads)


@pytest.mark.parametrize(("vocab", "m", "tokens", "expected"), [
    (5, 4, 8, "kept"),         # dense [M, V, D] blocks smaller than the rows: kept
    (40, 4, 4, "dense"),       # dense blocks, larger than the rows: rows held instead
    (1000, 8, 1, "ghost"),     # few rows, many micro-batches: R² < M²·R
    (1000, 4, 40, "compact"),  # many rows over a large vocabulary
])
def test_embedding_path_choice(vocab, m, tokens, expected):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(vocab, 4), nn.Flatten(), nn.Linear(4 * tokens, 3)).to(DT)
    x, y = torch.randint(0, min(vocab, 50), (m * 3, tokens)), torch.randint(0, 3, (m * 3,))
    ref, rows, ref_grads = sequential(copy.deepcopy(model), x, y, m, 2.0, "mean")
    res, grads = one_pass(model, x, y, m, 2.0, "mean")
    assert res.extra["plan"]["0.weight"] == expected
    assert_same(ref, rows, ref_grads, res, grads)


def test_batchnorm_eval_mode_uses_running_statistics():
    model, x, y = setup("conv2d_batchnorm_train", 4, batch=12)
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model.eval()
    ref, rows, ref_grads = sequential(copy.deepcopy(model), x, y, 4, 2.0, "mean")
    res, grads = one_pass(model, x, y, 4, 2.0, "mean")
    assert_same(ref, rows, ref_grads, res, grads)


def test_resnet_with_batchnorm_matches_sequential():
    """The experiments' ResNet-18: ghost batch norm, in-place ReLU, strided shortcuts."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 1, 16, width=4).to(DT)
    x, y = torch.randn(12, 1, 16, 16, dtype=DT), torch.randint(0, 10, (12,))
    ref_model = copy.deepcopy(model)
    ref, rows, ref_grads = sequential(ref_model, x, y, 4, 2.0, "mean")
    res, grads = one_pass(model, x, y, 4, 2.0, "mean")
    assert_same(ref, rows, ref_grads, res, grads)
    for a, b in zip(ref_model.buffers(), model.buffers(), strict=True):
        assert torch.allclose(a.to(DT), b.to(DT), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "conv2d_groupnorm"])
@pytest.mark.parametrize("budget", [0, None])
def test_non_finite_micro_batch_is_rejected_and_does_not_leak(name, budget):
    model, x, y = setup(name, 4, batch=12)
    x[4] = float("inf")  # micro-batch 1
    ref, rows, ref_grads = sequential(copy.deepcopy(model), x, y, 4, 2.0, "mean")
    res, grads = one_pass(model, x, y, 4, 2.0, "mean", keep_budget=budget)
    assert res.num_nonfinite == ref.num_nonfinite == 1
    assert torch.equal(res.accepted, ref.accepted)
    for a, b in zip(ref_grads, grads, strict=True):
        assert torch.isfinite(b).all()
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_skipped_step_leaves_no_gradient():
    model, x, y = setup("mlp", 4, batch=12)
    res, grads = one_pass(model, x, y, 4, 0.0, "mean")
    assert res.skipped and all(g is None for g in grads)
    assert torch.count_nonzero(res.grad) == 0


def test_parameters_restored_and_hooks_removed():
    model, x, y = setup("conv2d_batchnorm_train", 4)
    one_pass(model, x, y, 4, 2.0, "mean")
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    assert "forward" not in vars(model[1])  # ghost batch norm removed
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()  # an ordinary pass still works
    assert all(p.grad is not None for p in model.parameters())


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"parameter 'weight' of module 1 \(PReLU\)"):
        OnePassFilter(model)
    model[1].weight.requires_grad_(False)  # frozen: nothing to filter there
    OnePassFilter(model)


def test_tied_and_foreign_parameters_are_refused():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    with pytest.raises(ValueError, match="tied"):
        OnePassFilter(nn.Sequential(a, b))
    with pytest.raises(ValueError, match="not a parameter of the model"):
        OnePassFilter(nn.Linear(2, 2), params=[nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="dense Embedding"):
        OnePassFilter(nn.Embedding(4, 2, sparse=True))


def test_activations_must_be_sample_major():
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 2)

        def forward(self, x):
            return self.lin(x.transpose(0, 1)).transpose(0, 1).mean(2)

    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    with pytest.raises(ValueError, match="sample-major"):
        gaf.one_pass_filter(Transposed(), F.cross_entropy, x, y, 2)


def test_micro_batch_count_is_checked():
    model, x, y = setup("mlp", 2, batch=3)
    with pytest.raises(ValueError, match="cannot split a batch of 3 samples into 4"):
        gaf.one_pass_filter(model, F.cross_entropy, x, y, 4)


def test_memory_held_is_below_the_stacked_rows():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, 28)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    res = gaf.one_pass_filter(model, F.cross_entropy, x, y, 8, tau=2.0)
    p = sum(q.numel() for q in model.parameters())
    assert 0 < res.extra["held"] < p  # the stacked mode holds (M + 1)·P = 9·P
