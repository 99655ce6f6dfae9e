"""The demo's check: GAF against its matched blind control and averaging, paired by seed."""

from __future__ import annotations

import json

import pytest

from gaflab.cli import main
from gaflab.goal import check_goal, describe

from .conftest import write_idx_dataset
from .test_comparisons import _run


def _runs(gaf, control, average):
    runs = []
    for seed, (g, c, a) in enumerate(zip(gaf, control, average)):
        runs += [_run("gaf", seed, [g]), _run("average", seed, [a]),
                 _run("random-skip", seed, [c], matched_to="gaf (tau=0.97)")]
    return runs


def test_goal_met_only_when_both_leads_hold():
    met = check_goal(_runs([0.80, 0.82], [0.77, 0.79], [0.70, 0.76]))
    assert met["complete"] and met["met"]
    v = met["verdicts"][0]
    assert v["vs_control"]["diff_points"] == pytest.approx(3.0)
    assert v["vs_average"]["diff_points"] == pytest.approx(8.0)
    # GAF leads averaging by 8 points but its blind control by only 1: not met.
    near = check_goal(_runs([0.80, 0.82], [0.79, 0.81], [0.70, 0.76]))
    assert near["complete"] and not near["met"]
    assert near["verdicts"][0]["vs_control"]["met"] is False
    assert near["verdicts"][0]["vs_average"]["met"] is True
    assert any("NOT met" in line for line in describe(near))


def test_goal_incomplete_without_a_control():
    runs = [r for r in _runs([0.8], [0.7], [0.6]) if r.config["method"] != "random-skip"]
    verdict = check_goal(runs)
    assert not verdict["complete"] and not verdict["met"]
    assert any("incomplete" in line for line in describe(verdict))


def test_compare_check_writes_the_verdict(tmp_path, capsys):
    data = write_idx_dataset(tmp_path / "fm", n_train=300, n_test=60)
    out = tmp_path / "out"
    args = ["compare", "--dataset", "fashion-mnist", "--data-dir", str(data), "--no-download",
            "--train-size", "all", "--epochs", "1", "--micro-batch-size", "16",
            "--methods", "average", "gaf", "random-skip", "--seed", "0", "1", "--quiet",
            "--no-plots", "--jobs", "1", "--threads", "1", "--out", str(out), "--check"]
    assert main(args) == 0  # complete: the verdict is printed whether or not it is met
    verdict = json.loads((out / "check.json").read_text())
    assert verdict["complete"]
    v = verdict["verdicts"][0]
    assert len(v["vs_control"]["per_seed"]) == 2 and len(v["vs_average"]["per_seed"]) == 2
    printed = capsys.readouterr().out
    assert "check: gaf (tau=0.97)" in printed
    code = main(args + ["--require-goal", "--out", str(tmp_path / "out2")])
    assert code == (0 if verdict["met"] else 1)
