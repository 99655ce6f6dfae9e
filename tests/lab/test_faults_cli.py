"""`gaf compare --fault KIND --faulty-rows F`: the fault reaches every method's step through
the trainer's on_micro_gradient hook and is recorded in results.json."""

from __future__ import annotations

import json
import math

import pytest

from gaflab.cli import main


def test_fault_option_corrupts_every_method_and_is_recorded(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main([
        "compare", "--data-dir", str(fmnist_dir), "--train-size", "160", "--epochs", "1",
        "--micro-batch-size", "8", "--num-micro-batches", "4", "--methods", "average", "gaf",
        "--fault", "nonfinite", "--faulty-rows", "1", "--jobs", "1", "--threads", "1",
        "--quiet", "--no-plots", "--out", str(out),
    ])
    assert code == 0
    runs = {r["label"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    for r in runs.values():
        assert r["config"]["fault"] == "nonfinite" and r["config"]["faulty_rows"] == 1
    # Averaging takes the NaN row in (its loss is written as null); GAF rejects the row
    # every step and trains on.
    assert runs["average"]["history"][-1]["train_loss"] is None
    assert runs["average"]["summary"]["final_test_acc"] <= 0.11
    gaf_run = runs["gaf (tau=0.97)"]
    assert math.isfinite(gaf_run["history"][-1]["train_loss"])
    assert gaf_run["summary"]["final_test_acc"] > 0.2


@pytest.mark.parametrize(("argv", "message"), [
    (["--fault", "bitrot"], "invalid choice: 'bitrot'"),
    (["--fault", "scale", "--faulty-rows", "3"], "faulty_rows 3 exceeds the 2 micro-batches"),
    (["--rule", "multi-krum"], "needs more than 2f + 2 = 4 micro-gradients, got M = 2"),
])
def test_bad_fault_options_are_named(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["train", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
