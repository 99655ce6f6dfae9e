"""The noise scale in the lab: gaf train's history, gaf noise-scale, and the validation study's
exact per-sample reference against a plain loop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from gaflab.cli import main
from gaflab.models import build_model
from gaflab.studies import noise_scale as study
from gaflab.train import train

from .test_train import tiny


@pytest.mark.parametrize(("method", "extra"), [("gaf", {}), ("average", {}),
                                               ("random-skip", {"control_rate": 0.3}),
                                               ("gaf", {"num_micro_batches": 4})])
def test_train_writes_a_finite_positive_b_simple_every_epoch(fmnist_dir, method, extra):
    cfg = tiny(fmnist_dir, epochs=2, method=method, noise_rate=0.2, **extra)
    res = train(cfg)
    for row in res.history:
        assert math.isfinite(row["b_simple"]) and row["b_simple"] > 0, row["b_simple"]
        assert 0 < row["distance_forecast"] < 1
        assert row["distance_forecast"] == pytest.approx(
            row["b_simple"] / (row["b_simple"] + cfg.micro_batch_size))
    assert res.noise_scale["num_steps"] == res.steps


def test_without_recorded_distances_the_noise_scale_is_nan_not_invented(fmnist_dir):
    res = train(tiny(fmnist_dir, record_distances=False, max_steps=3))
    assert math.isnan(res.history[0]["b_simple"]) and res.noise_scale is None


def test_noise_scale_command_reports_b(fmnist_dir, capsys):
    code = main(["noise-scale", "--data-dir", str(fmnist_dir), "--train-size", "all",
                 "--micro-batch", "16", "--steps", "6", "--threads", "1", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "B_simple = tr(Σ)/|G|² =" in out and "b* = B(1-tau)/tau" in out
    assert "6 steps" in out


def test_exact_noise_scale_matches_a_per_sample_loop():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, 28, 4)
    x, y = torch.randn(12, 1, 28, 28), torch.randint(0, 10, (12,))
    got = study.exact_noise_scale(model, x, y, chunk=5)
    rows = []
    for i in range(12):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        g = torch.autograd.grad(loss, list(model.parameters()))
        rows.append(torch.cat([t.reshape(-1) for t in g]).double())
    r = torch.stack(rows)
    mean = r.mean(0)
    trace = float(((r - mean) ** 2).sum()) / 11  # the sample covariance's trace
    grad_sq = float(mean @ mean) - trace / 12
    assert got["trace_cov"] == pytest.approx(trace, rel=1e-6)
    assert got["grad_sq"] == pytest.approx(grad_sq, rel=1e-5)
    assert got["b_simple"] == pytest.approx(trace / grad_sq, rel=1e-5)


def test_study_runs_at_tiny_scale_and_writes_its_tables(fmnist_dir, tmp_path):
    out = tmp_path / "ns"
    code = study.main(["--data-dir", str(fmnist_dir), "--train-size", "300", "--test-size",
                       "50", "--at", "1", "--steps", "4", "--pairs", "3", "--threads", "1",
                       "--out", str(out)])
    assert code == 0
    res = json.loads((out / "validation.json").read_text())
    assert set(res["points"]) == {"0", "1"}
    p = res["points"]["1"]
    assert p["exact"]["n"] == 300 and math.isfinite(p["exact"]["b_simple"])
    assert [r["b"] for r in p["forecast"]] == list(study.SIZES)
    assert p["training_b_simple"] > 0
    assert "| after epoch |" in (out / "tables.md").read_text()


def test_report_plots_b_simple_and_forecast(fmnist_dir, tmp_path):
    pytest.importorskip("matplotlib")
    from gaflab.plots import plot_noise_scale

    res = train(tiny(fmnist_dir, epochs=2, max_steps=5))
    path = plot_noise_scale([res], tmp_path / "noise_scale.png")
    assert path.exists() and path.stat().st_size > 1000
    res.history = [{k: v for k, v in h.items() if k != "b_simple"} for h in res.history]
    assert plot_noise_scale([res], tmp_path / "none.png") is None
