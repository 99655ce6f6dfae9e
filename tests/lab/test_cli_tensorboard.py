"""`gaf train/compare --tensorboard DIR`: every finished run as TensorBoard logs, read back."""

from __future__ import annotations

import csv
import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gaflab.cli import main

TINY = ["--train-size", "128", "--epochs", "2", "--micro-batch-size", "8", "--quiet",
        "--no-plots"]


def test_train_writes_tensorboard_logs_of_its_run(fmnist_dir, tmp_path, capsys):
    board = tmp_path / "board"
    assert main(["train", "--data-dir", str(fmnist_dir), "--method", "gaf", *TINY,
                 "--out", str(tmp_path / "t"), "--tensorboard", str(board)]) == 0
    assert str(board) in capsys.readouterr().out
    (run_dir,) = board.iterdir()
    history = json.loads((tmp_path / "t" / "results.json").read_text())["runs"][0]["history"]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    skip = events.Scalars("epoch/skip_rate")
    assert [e.step for e in skip] == [row["epoch"] for row in history] == [1, 2]
    assert [e.value for e in skip] == [float(row["skip_rate"]) for row in history]
    assert len(events.Scalars("gaf/distance")) > 0  # the per-step distance trace
    with open(run_dir / "epochs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["test_acc"]) for r in rows] == [row["test_acc"] for row in history]


def test_compare_writes_one_log_directory_per_run(fmnist_dir, tmp_path):
    board = tmp_path / "board"
    assert main(["compare", "--data-dir", str(fmnist_dir), "--methods", "gaf", "average",
                 "--noise-rate", "0.4", "--seed", "0", "--jobs", "1", *TINY,
                 "--out", str(tmp_path / "c"), "--tensorboard", str(board)]) == 0
    runs = json.loads((tmp_path / "c" / "results.json").read_text())["runs"]
    assert len(list(board.iterdir())) == len(runs) == 2
