"""Speed options on the CPU: bf16/fp16 autocast through GAFTrainer, channels-last, compile."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from gaf import GAFTrainer
from gaflab import speed
from gaflab.models import build_model


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _trainer(model, amp=None, tau=2.0, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return GAFTrainer(model, opt, F.cross_entropy, 2, tau=tau, **speed.trainer_options(amp, "cpu"))


def _model(width=8):
    torch.manual_seed(0)
    return build_model("small_cnn", 10, 1, 28, width)


def test_check_amp_names_and_refusal():
    assert speed.check_amp("bfloat16") == "bf16"
    assert speed.check_amp("FP16") == "fp16"
    assert speed.check_amp("none") is None and speed.check_amp(None) is None
    with pytest.raises(ValueError, match="unknown amp 'int8'; choose from bf16, fp16"):
        speed.check_amp("int8")
    assert speed.make_scaler("bf16", "cpu") is None
    assert isinstance(speed.make_scaler("fp16", "cpu"), torch.amp.GradScaler)


def test_bf16_autocast_trains_in_bf16_and_keeps_float32_weights():
    model = _model()
    seen = []
    model.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer = _trainer(model, "bf16")
    ref = _trainer(_model())
    x, y = _batch()
    losses = [float(trainer.step(x, y).loss) for _ in range(12)]
    ref_losses = [float(ref.step(x, y).loss) for _ in range(12)]
    assert set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < 0.7 * losses[0]  # it fits the batch
    assert abs(losses[-1] - ref_losses[-1]) < 0.1 * ref_losses[-1]  # as float32 does
    # bf16 moves the decision statistics only slightly against float32 for the same step
    d16 = _trainer(_model(), "bf16").step(x, y).result.distances
    d32 = _trainer(_model()).step(x, y).result.distances
    assert torch.allclose(d16, d32, atol=0.05)


def test_fp16_goes_through_the_grad_scaler():
    model = _model()
    trainer = _trainer(model, "fp16")
    x, y = _batch()
    before = [p.detach().clone() for p in model.parameters()]
    out = trainer.step(x, y)
    assert not out.skipped and not out.overflow
    assert trainer.scaler.get_scale() == 65536.0  # no overflow at the initial scale
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert "scaler" in trainer.state_dict()


def test_channels_last_changes_layout_not_values():
    x, y = _batch()
    plain, nhwc = _model(), _model()
    speed.prepare_model(nhwc, channels_last=True)
    assert nhwc.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    xs = speed.step_input(x, True)
    assert xs.is_contiguous(memory_format=torch.channels_last) and torch.equal(xs, x)
    a, b = _trainer(plain, tau=0.97), _trainer(nhwc, tau=0.97)
    for _ in range(3):
        ra, rb = a.step(x, y), b.step(xs, y)
        assert ra.skipped == rb.skipped
        assert torch.allclose(ra.result.distances, rb.result.distances, atol=1e-5)
    for p, q in zip(plain.parameters(), nhwc.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)


def test_compiled_model_steps_like_the_eager_one(monkeypatch):
    """torch.compile (inductor, C++ on the CPU) of a tiny model: about 10-20 s here, most
    of it the first step's compilation."""
    import torch._inductor.config as inductor_config

    # Compile in this process: a pool of compile workers, each importing torch, costs more
    # than the two small graphs it would compile (20 s against 30 s wall on 2 busy cores).
    monkeypatch.setattr(inductor_config, "compile_threads", 1)
    x, y = _batch(8)
    eager, base = _model(width=2), _model(width=2)
    compiled = speed.prepare_model(base, compile=True)
    assert compiled is not base
    assert [id(p) for p in compiled.parameters()] == [id(p) for p in base.parameters()]
    a, b = _trainer(eager), _trainer(compiled)
    for _ in range(3):
        a.step(x, y)
        b.step(x, y)
    for p, q in zip(eager.parameters(), base.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)


def test_the_loop_steps_the_compiled_module(fmnist_dir, monkeypatch):
    """With compile=True the loop's training steps call what torch.compile returned (here
    a counting stand-in: the test above runs the real compiler), and evaluation the module
    itself."""
    from torch import nn

    from gaflab.config import TrainConfig
    from gaflab.train import train

    class Counting(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x):
            self.calls += 1
            return self.inner(x)

    made = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: made.append(Counting(model))
                        or made[-1])
    cfg = TrainConfig(data_dir=str(fmnist_dir), train_size=None, epochs=1, max_steps=3,
                      micro_batch_size=8, width=2, progress=False, threads=1, compile=True)
    run = train(cfg)
    assert len(made) == 1 and made[0].inner is run.model
    assert made[0].calls == 3 * cfg.num_micro_batches  # training forwards only
