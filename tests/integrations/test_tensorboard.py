"""StatsLogger writes what a GAFTrainer loop did, read back from real event and CSV files."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import gaf
from gaf.integrations.tensorboard import StatsLogger

from .tiny import make_data, make_net


def test_stats_logger_records_every_step_and_epoch(tmp_path):
    x, y = make_data(64)
    net = make_net()
    trainer = gaf.GAFTrainer(net, torch.optim.SGD(net.parameters(), lr=0.1), F.cross_entropy,
                             2, tau=0.9)
    skipped = []
    with StatsLogger(tmp_path) as logger:
        for step, start in enumerate(range(0, 64, 8)):
            out = trainer.step(x[start:start + 8], y[start:start + 8])
            skipped.append(float(out.skipped))
            logger.log_step(step, out, trainer.stats)
        logger.log_epoch(0, {"skip_rate": trainer.stats.skip_rate, "accuracy": 0.5})
        logger.log_epoch(1, {"skip_rate": 0.25, "accuracy": 0.75, "extra": 1})
    assert 0 < sum(skipped) < len(skipped)

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.value for e in events.Scalars("gaf/skipped")] == skipped
    assert [e.step for e in events.Scalars("gaf/skipped")] == list(range(8))
    final_rate = events.Scalars("gaf/skip_rate")[-1].value
    assert final_rate == pytest.approx(trainer.stats.skip_rate)
    assert [e.value for e in events.Scalars("epoch/accuracy")] == [0.5, 0.75]

    with open(tmp_path / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["skipped"]) for r in rows] == skipped
    assert all(float(r["loss"]) > 0 for r in rows)
    with open(tmp_path / "epochs.csv") as f:
        epochs = list(csv.DictReader(f))
    assert epochs[1] == {"epoch": "1", "skip_rate": "0.25", "accuracy": "0.75", "extra": "1.0"}
    assert epochs[0]["extra"] == ""


def test_stats_logger_csv_only_and_clear_errors(tmp_path):
    logger = StatsLogger(tmp_path, tensorboard=False)
    result = gaf.filter_gradients(torch.eye(3), tau=2.0)
    row = logger.log_step(0, result)
    assert row["accepted"] == 3 and row["skipped"] == 0
    with pytest.raises(TypeError, match="StepResult"):
        logger.log_step(1, {"skipped": 1})
    with pytest.raises(TypeError, match="'name' is str"):
        logger.log_epoch(0, {"name": "gaf"})
    logger.close()
    assert not list(tmp_path.glob("events.*"))
    with pytest.raises(RuntimeError, match="closed"):
        logger.log_step(2, result)
