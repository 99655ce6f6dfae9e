"""Comparisons: matched controls, paired differences, the method columns of the outputs."""

from __future__ import annotations

import json
import math

import pytest

from gaflab.cli import main
from gaflab.compare import expand_grid, match_control
from gaflab.config import TrainConfig
from gaflab.paired import paired_differences, t_interval, t_quantile_975
from gaflab.results import RunResult, setting_key

from .conftest import write_idx_dataset


def test_t_interval_matches_hand_computed_values():
    mean, half, n = t_interval([1.0, 2.0, 3.0])
    # s = 1, t_{0.975, 2} = 4.303: half width 4.303 / sqrt(3)
    assert (mean, n) == (2.0, 3) and half == pytest.approx(4.303 / math.sqrt(3))
    assert t_interval([2.5])[:2] == (2.5, pytest.approx(float("nan"), nan_ok=True))
    assert t_quantile_975(30) == 2.042
    assert t_quantile_975(200) == pytest.approx(1.972, abs=1e-3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_975(0)


def _run(method: str, seed: int, acc: list[float], **cfg) -> RunResult:
    c = TrainConfig(method=method, seed=seed, **cfg).validate()
    hist = [{"epoch": i + 1, "test_acc": a, "memorised": 0.1, "skip_rate": 0.5,
             "non_anchor_drop_rate": 0.25 + 0.1 * i} for i, a in enumerate(acc)]
    return RunResult(config=c.to_dict(), label=c.label, history=hist, steps=10,
                     skipped_steps=4)


def test_paired_differences_pair_by_seed_with_the_matched_control():
    runs = []
    for seed, (g, a, r) in enumerate([(0.80, 0.70, 0.78), (0.82, 0.71, 0.79), (0.84, 0.75, 0.80)]):
        runs += [_run("gaf", seed, [g]), _run("average", seed, [a]),
                 _run("random-skip", seed, [r], matched_to="gaf (tau=0.97)")]
    runs.append(_run("average", 0, [0.1], noise_rate=0.6))  # another setting: not paired
    rows = {d["kind"]: d for d in paired_differences(runs)}
    assert set(rows) == {"average", "control"}
    ctl = rows["control"]
    assert ctl["seeds"] == [0, 1, 2] and ctl["versus"] == "random-skip (matched)"
    assert ctl["final_test_acc_per_seed"] == pytest.approx([2.0, 3.0, 4.0])
    assert ctl["final_test_acc_diff_points"] == pytest.approx(3.0)
    assert ctl["final_test_acc_ci95_points"] == pytest.approx(4.303 / math.sqrt(3))
    assert rows["average"]["final_test_acc_diff_points"] == pytest.approx(10.0)


def test_grid_matches_controls_to_every_gaf_variant():
    base = TrainConfig(train_size=None)
    grid = expand_grid(base, ["gaf", "random-skip", "average"], taus=(0.9, 0.97), seeds=[0, 1])
    controls = [c for c in grid if c.method == "random-skip"]
    assert len(controls) == 4  # 2 GAF variants x 2 seeds
    assert {c.matched_to for c in controls} == {"gaf (tau=0.9)", "gaf (tau=0.97)"}
    assert all(c.control_rate is None and "matched to" in c.label for c in controls)
    with pytest.raises(ValueError, match="a gaf run is not in the comparison to match"):
        expand_grid(base, ["average", "random-drop"])
    gaf = _run("gaf", 0, [0.8, 0.9])
    skip = match_control(TrainConfig(method="random-skip", matched_to=gaf.label), gaf)
    assert skip.control_rate == 0.4  # 4 of 10 steps skipped
    drop = match_control(TrainConfig(method="random-drop", matched_to=gaf.label,
                                     match_per_epoch=True), gaf)
    assert drop.control_rates == pytest.approx([0.25, 0.35])
    assert setting_key(skip.to_dict()) == setting_key(gaf.config)


def test_train_asks_a_control_for_its_rate(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--method", "random-skip", "--quiet"])
    assert "random-skip needs --control-rate" in capsys.readouterr().err


def test_compare_baselines_write_per_epoch_kept_noise(tmp_path, capsys):
    data = write_idx_dataset(tmp_path / "fashion-mnist", n_train=400, n_test=100)
    out = tmp_path / "out"
    assert main(["compare", "--data-dir", str(data), "--methods", "average", "gaf",
                 "small-loss", "gce", "--epochs", "1", "--train-size", "400", "--jobs", "1",
                 "--forget-epochs", "0",
                 "--threads", "1", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "what each method kept" in printed and "GAF − other" in printed
    doc = json.loads((out / "results.json").read_text())
    runs = {r["config"]["method"]: r for r in doc["runs"]}
    assert set(runs) == {"average", "gaf", "small-loss", "gce"}
    for method in ("gaf", "small-loss"):
        h = runs[method]["history"][0]
        assert 0.0 <= h["kept_noise_fraction"] <= 1.0, method
        assert "dropped_noise_fraction" in h and "kept_noise_chance_std" in h, method
    h = runs["small-loss"]["history"][0]  # forget rate 0.4 from the first epoch
    assert h["kept_noise_fraction"] < 0.4 < h["dropped_noise_fraction"]
    for method in ("average", "gce"):  # keep everything: null (NaN), never 0
        assert runs[method]["history"][0]["kept_noise_fraction"] is None
    assert [d["kind"] for d in doc["paired_differences"]] == ["average"]
    report = (out / "report.md").read_text()
    assert "What each method kept" in report and "forget rate 0.4" in report
    assert (out / "selection.png").exists() and (out / "differences.png").exists()


def test_noisy_baselines_recipe_runs_every_method_and_setting_at_tiny_scale(tmp_path):
    from gaflab.recipes import get_recipe

    recipe = get_recipe("noisy-baselines")
    assert recipe.seeds == (0, 1, 2) and len(recipe.settings) == 4
    data = write_idx_dataset(tmp_path / "fashion-mnist", n_train=400, n_test=50)
    out = tmp_path / "out"
    assert main(["compare", "--recipe", "noisy-baselines", "--data-dir", str(data),
                 "--train-size", "400", "--epochs", "1", "--max-steps", "2", "--seed", "0",
                 "--width", "4", "--jobs", "1", "--threads", "1", "--quiet", "--no-plots",
                 "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    runs = doc["runs"]
    assert len(runs) == 7 * 4
    labels = {r["label"] for r in runs}
    assert labels == {"average", "gaf (tau=0.97)", "random-drop (matched)",
                      "gaf (tau=0.97, consensus)", "small-loss", "gce", "early-stop"}
    settings = {(r["config"]["noise"], r["config"]["noise_rate"], r["config"]["noise_sources"])
                for r in runs}
    assert settings == {("symmetric", 0.4, None), ("symmetric", 0.6, None),
                        ("asymmetric", 0.4, None), ("symmetric", 0.4, 10)}
    for r in runs:
        assert r["config"]["holdout_fraction"] == 0.1  # every run trains on the same 90%
        if r["config"]["method"] == "random-drop":
            assert r["config"]["control_rate"] is not None
            assert r["config"]["matched_to"] == "gaf (tau=0.97)"
    kinds = sorted(d["kind"] for d in doc["paired_differences"])
    # per setting: gaf vs average and vs its control; consensus vs average
    assert kinds == ["average"] * 8 + ["control"] * 4
