"""GAF in an ordinary training loop: collector, one-call trainer, vmap micro-gradients."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gaf
from gaf.collector import GradientCollector
from gaf.micrograds.vmap import micro_gradients, vectorised_filter_step
from gaf.reference import reference_filter


def small_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def batch(n=24, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen, dtype=dtype), torch.randint(0, 4, (n,), generator=gen)


def manual_micro_gradients(model, x, y, m):
    rows = []
    for xs, ys in zip(torch.tensor_split(x, m), torch.tensor_split(y, m), strict=True):
        model.zero_grad()
        F.cross_entropy(model(xs), ys).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad()
    return torch.stack(rows)


def collect_with(collector, model, x, y, m, zero_between=False):
    for xs, ys in zip(torch.tensor_split(x, m), torch.tensor_split(y, m), strict=True):
        F.cross_entropy(model(xs), ys).backward()
        collector.collect()
        if zero_between:
            model.zero_grad(set_to_none=True)
    return collector.finish()


@pytest.mark.parametrize("rule", gaf.RULES)
@pytest.mark.parametrize("mode", ["streaming", "streaming-device-side", "stacked"])
def test_collector_matches_filter_and_reference(rule, mode):
    # "device-side" forces the torch.where path accelerators take (no host sync).
    device_side = mode.endswith("device-side")
    mode = mode.removesuffix("-device-side")
    if mode == "streaming" and rule not in ("mean", "halving"):
        with pytest.raises(ValueError, match="stacked"):
            GradientCollector(small_model().parameters(), rule=rule, mode=mode)
        return
    for seed in range(6):
        model = small_model(seed=seed)
        x, y = batch(seed=seed + 100)
        m = 2 + seed % 6
        rows = manual_micro_gradients(model, x, y, m)
        for tau in (0.5, 0.9, 0.97, 1.0, 1.2):
            ref = reference_filter(rows, tau, rule)
            if any(abs(d - tau) < 1e-9 for d in ref["distances"][1:]):
                continue
            collector = GradientCollector(model.parameters(), tau=tau, rule=rule, mode=mode)
            collector.device_side = device_side or collector.device_side
            result = collect_with(collector, model, x, y, m, zero_between=seed % 2 == 1)
            assert result.accepted.tolist() == ref["accepted"]
            assert result.distances.tolist() == pytest.approx(ref["distances"], abs=1e-9)
            if result.skipped:
                assert all(p.grad is None for p in model.parameters())
            else:
                written = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
                assert torch.allclose(written, ref["grad"], atol=1e-12)
                assert torch.allclose(result.grad, ref["grad"], atol=1e-12)
            model.zero_grad(set_to_none=True)


def test_streaming_holds_one_running_sum():
    model = small_model()
    collector = GradientCollector(model.parameters(), tau=2.0)
    x, y = batch(n=64)
    collect_with(collector, model, x, y, 16)
    assert collector.mode == "streaming"
    assert collector.backend.rows is None  # no [M, P] stack was ever allocated


def plain_accumulation(model, opt, x, y, m):
    opt.zero_grad()
    for xs, ys in zip(torch.tensor_split(x, m), torch.tensor_split(y, m), strict=True):
        (F.cross_entropy(model(xs), ys) / m).backward()
    opt.step()


@pytest.mark.parametrize("mode", ["streaming", "stacked"])
def test_tau_two_matches_plain_gradient_accumulation(mode):
    plain = small_model()
    filtered = copy.deepcopy(plain)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    opt_gaf = torch.optim.SGD(filtered.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    trainer = gaf.GAFTrainer(filtered, opt_gaf, F.cross_entropy, 4, tau=2.0, mode=mode)
    for step in range(5):
        x, y = batch(seed=step)
        plain_accumulation(plain, opt_plain, x, y, 4)
        out = trainer.step(x, y)
        assert not out.skipped
    for p, q in zip(plain.parameters(), filtered.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-12, rtol=0)
    assert trainer.stats.steps == 5 and trainer.stats.acceptance_rate == 1.0


def test_skipped_step_does_not_touch_the_optimizer():
    model = small_model()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(1))
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, 3, tau=0.0)
    x, y = batch()
    out = trainer.step(x, y)
    assert out.skipped and out.result.num_accepted == 1
    assert calls == []
    assert opt.state == {} or all("momentum_buffer" not in s for s in opt.state.values())
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert trainer.stats.skipped_steps == 1 and trainer.stats.skip_rate == 1.0


def test_skips_are_visible_to_a_scheduler():
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, 2, tau=0.0)
    x, y = batch()
    for _ in range(3):
        if not trainer.step(x, y).skipped:
            sched.step()
    assert opt.param_groups[0]["lr"] == 1.0


class TwoHeads(nn.Module):
    """A frozen embedding, and a head that only some micro-batches use."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(6, 6).double().requires_grad_(False)
        self.body = nn.Linear(6, 4).double()
        self.extra = nn.Linear(6, 4).double()
        self.use_extra = False

    def forward(self, x):
        h = self.frozen(x)
        out = self.body(h)
        return out + self.extra(h) if self.use_extra else out


def test_frozen_and_unused_parameters_count_as_zero():
    model = TwoHeads()
    collector = GradientCollector(model.parameters(), tau=2.0)
    assert len(collector.flat.params) == 4  # the frozen layer is left out
    x, y = batch()
    rows = []
    for k, (xs, ys) in enumerate(zip(torch.tensor_split(x, 3), torch.tensor_split(y, 3))):
        model.use_extra = k == 1
        F.cross_entropy(model(xs), ys).backward()
        rows.append(torch.cat([
            torch.zeros(p.numel(), dtype=p.dtype) if p.grad is None else p.grad.reshape(-1).clone()
            for p in collector.flat.params
        ]))
        collector.collect()
    result = collector.finish()
    expected = torch.stack(rows).mean(0)
    assert torch.allclose(result.grad, expected)
    assert model.frozen.weight.grad is None
    assert model.extra.weight.grad is not None  # it got the filtered (partly zero) mean


@pytest.mark.parametrize("device_side", [False, True])
@pytest.mark.parametrize("rule", ["mean", "halving", "neighbours"])
def test_nonfinite_micro_gradient_is_rejected_and_counted(device_side, rule):
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, 4, tau=2.0, rule=rule)
    trainer.collector.device_side = device_side
    poison = {"k": 0}

    def hook(grad):
        poison["k"] += 1
        return grad * float("nan") if poison["k"] == 2 else grad

    model[0].weight.register_hook(hook)
    x, y = batch()
    out = trainer.step(x, y)
    r = out.result
    assert r.accepted.tolist() == [True, False, True, True]
    assert r.num_nonfinite == 1 and trainer.stats.nonfinite == 1
    assert not out.skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_clipping_applies_after_filtering():
    model = small_model()
    twin = copy.deepcopy(model)
    x, y = batch()
    rows = manual_micro_gradients(twin, x, y, 3)
    filtered = gaf.filter_gradients(rows, tau=1.5).grad
    norm = filtered.norm()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, 3, tau=1.5, max_grad_norm=float(norm) / 4)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    trainer.step(x, y)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.allclose(before - after, filtered / 4, atol=1e-6)


def test_autocast_bfloat16_on_cpu():
    model = small_model(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = gaf.GAFTrainer(
        model, opt, F.cross_entropy, 2, tau=2.0, autocast_dtype=torch.bfloat16
    )
    x, y = batch(dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    out = trainer.step(x, y)
    assert not out.skipped
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_grad_scaler_overflow_skips_and_backs_off():
    model = small_model(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, 2, tau=2.0, scaler=scaler)
    x, y = batch(dtype=torch.float32)
    # A normal step: the filtered gradient is unscaled before the optimizer sees it.
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    plain_accumulation(ref, ref_opt, x, y, 2)
    out = trainer.step(x, y)
    assert not out.skipped and not out.overflow
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    # An overflowing micro-batch: the scaler skips the step and lowers its scale.
    handle = model[0].weight.register_hook(lambda g: g * float("inf"))
    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    out = trainer.step(x, y)
    handle.remove()
    assert out.skipped and out.overflow
    assert scaler.get_scale() < scale
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_state_dict_round_trip():
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, 3, tau=0.9)
    for step in range(4):
        trainer.step(*batch(seed=step))
    state = trainer.state_dict()
    # A trainer built with another fixed tau refuses the state (issue 19, case 4: it used
    # to take the saved tau silently); one built with the run's tau resumes it.
    with pytest.raises(ValueError, match="tau 0.9.*tau 0.5"):
        gaf.GAFTrainer(model, opt, F.cross_entropy, 3, tau=0.5).load_state_dict(state)
    fresh = gaf.GAFTrainer(model, opt, F.cross_entropy, 3, tau=0.9)
    fresh.load_state_dict(state)
    assert fresh.stats == trainer.stats
    assert fresh.collector.tau == 0.9
    assert fresh.stats.steps == 4


def test_changed_parameter_shape_is_named():
    model = small_model()
    collector = GradientCollector(model.parameters())
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    collector.collect()
    model[2].weight.data = torch.zeros(5, 16, dtype=torch.float64)
    model[2].weight.grad = None
    with pytest.raises(ValueError, match="changed shape"):
        collector.collect()


def test_bad_arguments():
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="unknown mode"):
        GradientCollector(model.parameters(), mode="fast")
    with pytest.raises(ValueError, match="tau"):
        GradientCollector(model.parameters(), tau=3.0)
    with pytest.raises(ValueError, match="no trainable"):
        GradientCollector([torch.zeros(2)])
    with pytest.raises(RuntimeError, match="before any collect"):
        GradientCollector(model.parameters()).finish()
    with pytest.raises(ValueError, match="num_micro_batches"):
        gaf.GAFTrainer(model, opt, F.cross_entropy, 0)
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, 8)
    with pytest.raises(ValueError, match="cannot split a batch of 4"):
        trainer.step(*batch(n=4))


def test_vmap_micro_gradients_equal_the_loop():
    model = small_model()
    x, y = batch(n=24)
    rows, losses = micro_gradients(model, F.cross_entropy, x, y, 4)
    assert torch.allclose(rows, manual_micro_gradients(model, x, y, 4), atol=1e-12)
    assert losses.shape == (4,)
    result, _ = vectorised_filter_step(model, F.cross_entropy, x, y, 4, tau=2.0)
    written = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(written, rows.mean(0))
    assert not result.skipped


def test_vmap_refuses_batchnorm_in_training_mode():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)).double()
    x, y = batch()
    with pytest.raises(ValueError, match="BatchNorm in training mode"):
        micro_gradients(model, F.cross_entropy, x, y, 4)
    model.eval()
    rows, _ = micro_gradients(model, F.cross_entropy, x, y, 4)
    assert rows.shape[0] == 4
    with pytest.raises(ValueError, match="divisible"):
        micro_gradients(model, F.cross_entropy, x, y, 5)


@pytest.mark.parametrize("mode", ["streaming", "stacked"])
def test_begin_binds_grad_and_the_direction_buffer_is_reused(mode):
    model = small_model()
    collector = GradientCollector(model.parameters(), tau=2.0, mode=mode)
    x, y = batch()
    grads = []
    for _ in range(4):
        for p in model.parameters():
            p.grad = torch.full_like(p, 7.0)  # stale: begin() must drop it
        collector.begin()
        assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
        rows = manual_micro_gradients(copy.deepcopy(model), x, y, 2)
        result = collect_with(collector, model, x, y, 2)
        assert torch.allclose(result.grad, rows.mean(0))
        grads.append(result.grad.data_ptr())
    # Results live in reused buffers (documented: valid until the next step starts).
    assert len(set(grads)) <= 2
    F.cross_entropy(model(x), y).backward()
    collector.collect()
    with pytest.raises(RuntimeError, match="middle of a step"):
        collector.begin()
