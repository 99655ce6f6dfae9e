"""The compute study: its grid, its resumable cells, the lr choice and the report."""

from __future__ import annotations

import json

import pytest

from gaflab.studies import compute, compute_report

from .conftest import write_cifar100

TINY = ["--device", "cpu", "--width", "8", "--train-size", "8", "--test-size", "8",
        "--epochs", "1", "--sizes", "2", "--lrs", "0.01", "0.04", "--noises", "sym40",
        "--seeds", "0"]


def test_paper_preset_runs_at_tiny_scale_on_cifar100_pickles(tmp_path, capsys):
    data = write_cifar100(tmp_path, n_train=200, n_test=100).parent
    raw = tmp_path / "raw"
    argv = ["--preset", "paper", "--data-dir", str(data), "--raw", str(raw), *TINY]
    assert compute.main(argv) == 0
    names = sorted(p.name for p in raw.glob("*.json"))
    tune = [n for n in names if "_s100_" in n]
    assert tune == ["sym40_b2_lr0.01_s100_average-gaf-random-skip.json",
                    "sym40_b2_lr0.04_s100_average-gaf-random-skip.json"]
    seeds = [n for n in names if "_s0_" in n]
    assert seeds, names
    for name in tune:
        runs = json.loads((raw / name).read_text())["runs"]
        assert [r["config"]["method"] for r in runs] == ["average", "gaf", "random-skip"]
        assert {r["config"]["dataset"] for r in runs} == {"cifar100"}
        assert {r["config"]["model"] for r in runs} == {"resnet18"}
        assert all(r["config"]["schedule"] == "cosine" for r in runs)
        assert all("distance_trace" not in r for r in runs)
    # The control runs at GAF's lr on the reported seed.
    best = compute.best_lrs(compute.parse_args(argv)[1], raw, "sym40", 2)
    control = [n for n in seeds if "random-skip" in n]
    assert control and all(f"_lr{best['gaf']:g}_" in n for n in control)
    # A second call finds every cell done and trains nothing.
    before = {p.name: p.stat().st_mtime_ns for p in raw.glob("*.json")}
    capsys.readouterr()
    assert compute.main(argv) == 0
    assert "0 cells to run" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in raw.glob("*.json")} == before
    # The report reads the raw files back.
    table = compute_report.write_report(raw, tmp_path / "report").read_text()
    assert "### Stability" in table and "| 2 | GAF (tau 0.97) |" in table
    assert (tmp_path / "report" / "stability-sym40.png").exists()


def _cell(raw, noise, size, lr, accuracies):
    cell = compute.Cell(noise, size, lr, compute.TUNE_SEED)
    runs = [{"config": {"method": m}, "summary": {"final_test_acc": a}}
            for m, a in accuracies.items()]
    (raw / f"{cell.name}.json").write_text(json.dumps({"runs": runs}))


def test_best_lr_is_chosen_per_method_and_the_control_follows_gaf(tmp_path):
    preset = compute.PRESETS["fmnist"]
    lrs = preset.lrs
    assert compute.best_lrs(preset, tmp_path, "sym40", 4) is None  # grid not done yet
    scores = [(0.50, 0.60, 0.70), (0.80, 0.55, 0.65), (None, 0.75, 0.90), (0.10, 0.20, 0.30)]
    scores += [(0.05, 0.05, 0.05)] * (len(lrs) - len(scores))  # a grid of any length
    table = dict(zip(lrs, scores, strict=True))
    for lr, (avg, gaf, ctl) in table.items():
        _cell(tmp_path, "sym40", 4, lr, {"average": avg, "gaf": gaf, "random-skip": ctl})
    best = compute.best_lrs(preset, tmp_path, "sym40", 4)
    assert best == {"average": lrs[1], "gaf": lrs[2], "random-skip": lrs[2]}
    cells = compute.seed_cells(preset, tmp_path, "sym40", 4)
    assert [(c.lr, c.methods) for c in cells[:2]] == [(lrs[2], ("gaf", "random-skip")),
                                                     (lrs[1], ("average",))]


def test_bad_grid_is_refused(capsys):
    with pytest.raises(SystemExit):
        compute.parse_args(["--sizes", "0"])
    assert "must be positive" in capsys.readouterr().err
