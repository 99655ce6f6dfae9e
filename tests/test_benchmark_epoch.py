"""benchmarks/epoch.py runs end to end (one tiny setting) and prints rates, ratio, estimates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "epoch.py"


@pytest.fixture(scope="module")
def epoch_benchmark():
    spec = importlib.util.spec_from_file_location("epoch_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_setting_prints_rates_ratio_and_recipe_estimates(epoch_benchmark, capsys):
    rc = epoch_benchmark.main(["--device", "cpu", "--models", "small_cnn", "--amp", "fp32",
                               "bf16", "--compile-models", "--steps", "1", "--reps", "2",
                               "--warmup", "0", "--micro-batch-size", "8"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [line for line in out.splitlines() if line.startswith("| small_cnn | 2x8 |")]
    assert [r.split("|")[3].strip() for r in rows] == ["fp32", "bf16"]
    for row in rows:
        avg, gaf_rate, ratio = (cell.split()[0] for cell in row.split("|")[5:8])
        assert float(avg) > 0 and float(gaf_rate) > 0 and float(ratio) > 0
    assert "torch " in out.splitlines()[0]  # the machine and versions
    estimate = [line for line in out.splitlines() if line.startswith("| fmnist-demo |")]
    assert len(estimate) == 2 and float(estimate[0].split("|")[6]) > 0


def test_recipe_estimate_arithmetic(epoch_benchmark):
    """One run of the plain comparison (the old demo's settings): 12 epochs × (19968 samples /
    1000 per s + 30000 / 3000 per s)."""
    lines = epoch_benchmark.recipe_estimates({("small_cnn", "fp32"): 1000.0},
                                             {("small_cnn", "fp32"): 3000.0})
    demo = [line for line in lines if line.startswith("| plain |")][0].split("|")
    assert float(demo[6]) == pytest.approx(12 * (19968 / 1000 + 30000 / 3000) / 3600, abs=0.01)
    assert demo[3].strip() == "2"  # averaging and GAF
