"""Finite float32 micro-gradients of extreme magnitude decide as their unscaled selves.

A float32 |g|² overflows for entries around 1e19 and up and underflows to zero around
1e-23 and below, so a float32 Gram (or streaming norm) used to call such finite rows
non-finite or zero and reject them. Scaling every row by the same power of ten must change
no decision (cosine distance is scale-invariant); the distances agree to float32 rounding.
"""

import pytest
import torch
from torch import nn

import gaf
from gaf.collector import GradientCollector
from gaf.core import STREAMING_RULES, gram_matrix

SCALES = (1e20, 1e30, 1e-30, 1e-36)
TAU = 0.5


def agreeing_rows(m=6, p=40, seed=0):
    """Rows around a shared direction with a spread that makes TAU a real filter."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(p, generator=gen)
    spread = torch.linspace(0.3, 2.0, m)[:, None]
    return base + spread * torch.randn(m, p, generator=gen)


def test_the_rows_are_a_real_filter():
    # Some accepted, some rejected at the unscaled size: the comparison below means something.
    r = gaf.filter_gradients(agreeing_rows(), TAU)
    assert 2 <= r.num_accepted < 6


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("rule", gaf.RULES)
def test_scaled_rows_decide_as_unscaled(scale, rule):
    x = agreeing_rows()
    scaled = x * scale
    assert torch.isfinite(scaled).all() and (scaled != 0).all()
    ref = gaf.filter_gradients(x, TAU, rule)
    out = gaf.filter_gradients(scaled, TAU, rule)
    assert out.num_invalid == 0
    assert out.accepted.tolist() == ref.accepted.tolist()
    torch.testing.assert_close(out.distances, ref.distances, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scale", SCALES)
def test_gram_of_scaled_rows_is_finite_and_scaled(scale):
    x = agreeing_rows()
    g = gram_matrix(x * scale)
    assert torch.isfinite(g).all() and (g.diagonal() > 0).all()
    ref = gram_matrix(x.double()) * scale**2
    torch.testing.assert_close(g.double(), ref, rtol=1e-5, atol=0)


def test_ordinary_rows_keep_a_float32_gram_bit_for_bit():
    x = agreeing_rows()
    g = gram_matrix(x)
    assert g.dtype == torch.float32 and torch.equal(g, x @ x.T)
    # A zero row (or a zero shard) stays on the float32 path too.
    x[2] = 0
    g = gram_matrix(x)
    assert g.dtype == torch.float32 and torch.equal(g, x @ x.T)


def test_nonfinite_rows_stay_invalid():
    x = agreeing_rows()
    x[1, 3] = float("inf")
    x[4, 0] = float("nan")
    r = gaf.filter_gradients(x * 1e20, 2.0)
    assert r.num_invalid == 2 and not r.accepted[1] and not r.accepted[4]


def collect_rows(rows: torch.Tensor, tau: float, rule: str, device_side: bool):
    """Feed each row to a streaming collector as a real .grad (d/dw of w·row is row)."""
    w = nn.Parameter(torch.zeros(rows.shape[1]))
    collector = GradientCollector([w], tau=tau, rule=rule, mode="streaming")
    collector.device_side = device_side
    for row in rows:
        (w * row).sum().backward()
        collector.collect()
    return collector.finish()


@pytest.mark.parametrize("device_side", [False, True])
@pytest.mark.parametrize("rule", STREAMING_RULES)
@pytest.mark.parametrize("scale", SCALES)
def test_streaming_scaled_rows_decide_as_unscaled(scale, rule, device_side):
    x = agreeing_rows()
    ref = collect_rows(x, TAU, rule, device_side)
    assert 2 <= ref.num_accepted < 6
    out = collect_rows(x * scale, TAU, rule, device_side)
    assert out.num_invalid == 0
    assert out.accepted.tolist() == ref.accepted.tolist()
    torch.testing.assert_close(out.distances, ref.distances, rtol=0, atol=1e-5)


def test_cosine_distance_of_extreme_vectors():
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([4.0, 3.0])
    for scale in SCALES:
        assert gaf.cosine_distance(a * scale, b * scale).item() == pytest.approx(1 - 24 / 25)


class Mixed(nn.Module):
    """An embedding, a conv and a wide linear layer, so the one-pass plan holds kept blocks
    and ghost products."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 6)
        self.conv = nn.Conv1d(6, 8, 3)
        self.wide = nn.Linear(8 * 6, 400)
        self.head = nn.Linear(400, 3)

    def forward(self, tokens):
        h = self.conv(self.emb(tokens).transpose(1, 2)).relu()
        return self.head(torch.tanh(self.wide(h.flatten(1))))


@pytest.mark.parametrize("scale", (1e20, 1e-30))
def test_one_pass_scaled_loss_decides_as_unscaled(scale):
    def step(micro_gradients, loss_scale):
        torch.manual_seed(0)
        model = Mixed()
        trainer = gaf.GAFTrainer(
            model, torch.optim.SGD(model.parameters(), lr=0.0),
            lambda out, y: nn.functional.cross_entropy(out, y) * loss_scale, 4, tau=1.0,
            micro_gradients=micro_gradients)
        gen = torch.Generator().manual_seed(1)
        x = torch.randint(0, 50, (16, 8), generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        return trainer.step(x, y).result

    ref = step("sequential", 1.0)
    assert 2 <= ref.num_accepted < 4
    out = step("one-pass", scale)
    assert "ghost" in out.extra["plan"].values()  # the ghost products are exercised
    assert out.num_invalid == 0
    assert out.accepted.tolist() == ref.accepted.tolist()
    torch.testing.assert_close(out.distances, ref.distances, rtol=0, atol=1e-4)
