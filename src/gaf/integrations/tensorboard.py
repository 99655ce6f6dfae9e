"""TensorBoard and CSV logs of GAF statistics, for any loop that steps with GAF::

    with StatsLogger("runs/gaf") as logger:                # TensorBoard events + CSV files
        for step, (x, y) in enumerate(loader):
            logger.log_step(step, trainer.step(x, y), trainer.stats)
        logger.log_epoch(epoch, {"test_accuracy": acc})    # any scalars, once an epoch

``log_step`` writes :func:`~gaf.integrations.common.step_statistics` under ``gaf/`` (and a
``StepResult``'s ``loss``, one device sync, and ``overflow``) to TensorBoard and
``steps.csv``; ``log_epoch`` to ``epoch/<name>`` and ``epochs.csv``. ``tensorboard=False``
writes the CSV files alone, with no extra package.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from pathlib import Path

from gaf.core import FilterResult, FilterStats
from gaf.integrations.common import WindowOutcome, step_statistics
from gaf.training import StepResult

__all__ = ["STEP_COLUMNS", "StatsLogger", "write_runs"]

STEP_COLUMNS = ("step", "loss", "skipped", "overflow", "accepted", "acceptance", "distance",
                "tau", "invalid", "skip_rate", "acceptance_rate")


class StatsLogger:
    """Write GAF step and epoch statistics to TensorBoard (``log_dir``) and CSV files.

    Args:
        log_dir: directory for the event files, ``steps.csv`` and ``epochs.csv``.
        tensorboard: write TensorBoard events (needs the ``tensorboard`` package).
        csv_files: write ``steps.csv`` and ``epochs.csv``.
        prefix: tag prefix of the step scalars in TensorBoard.
    """

    def __init__(self, log_dir: str | Path, *, tensorboard: bool = True, csv_files: bool = True,
                 prefix: str = "gaf/"):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # torch's writer needs the tensorboard package
                raise ImportError(
                    "TensorBoard logging needs the tensorboard package: pip install "
                    "'gaf[tensorboard]' (or pass tensorboard=False for CSV files only)"
                ) from exc
            self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self._steps_file = None
        self._steps_csv = None
        self.csv_files = csv_files
        self._epoch_rows: list[dict] = []
        self._closed = False

    def log_step(self, step: int, outcome: StepResult | FilterResult | WindowOutcome,
                 stats: FilterStats | None = None) -> dict[str, float]:
        """Record one step's statistics; returns the row written (without ``step``)."""
        self._check_open()
        loss = None
        overflow = False
        if isinstance(outcome, StepResult):
            loss, overflow, result = float(outcome.loss), outcome.overflow, outcome.result
        elif isinstance(outcome, WindowOutcome):
            overflow, result = outcome.overflow, outcome.result
        elif isinstance(outcome, FilterResult):
            result = outcome
        else:
            raise TypeError(
                "log_step takes a gaf StepResult, FilterResult or WindowOutcome, got "
                f"{type(outcome).__name__}"
            )
        row = step_statistics(result, stats, overflow)
        row["overflow"] = float(overflow)
        if loss is not None:
            row["loss"] = loss
        if self.writer is not None:
            for key, value in row.items():
                self.writer.add_scalar(self.prefix + key, value, step)
        if self.csv_files:
            if self._steps_csv is None:  # opened at the first step: no empty file otherwise
                self._steps_file = open(self.log_dir / "steps.csv", "w", newline="")  # noqa: SIM115
                self._steps_csv = csv.DictWriter(self._steps_file, STEP_COLUMNS)
                self._steps_csv.writeheader()
            self._steps_csv.writerow({"step": step, **row})
        return row

    def log_epoch(self, epoch: int, row: dict[str, float]) -> None:
        """Record scalars once an epoch (e.g. accuracies, the epoch's skip rate)."""
        self._check_open()
        clean = {}
        for key, value in row.items():
            try:
                clean[key] = float(value)
            except (TypeError, ValueError):
                raise TypeError(
                    f"log_epoch takes numbers; {key!r} is {type(value).__name__}"
                ) from None
        if self.writer is not None:
            for key, value in clean.items():
                self.writer.add_scalar(f"epoch/{key}", value, epoch)
        if self.csv_files:
            self._epoch_rows.append({"epoch": epoch, **clean})
            self._write_epochs()

    def _check_open(self) -> None:
        if self._closed:  # reopening steps.csv would truncate what was written
            raise RuntimeError(f"StatsLogger for {self.log_dir} is closed")

    def _write_epochs(self) -> None:
        # Epoch rows are few and may gain columns: the file is rewritten with every column.
        columns = ["epoch"]
        for r in self._epoch_rows:
            columns += [k for k in r if k not in columns]
        with open(self.log_dir / "epochs.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(self._epoch_rows)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        if self._steps_file is not None:
            self._steps_file.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self._steps_file is not None:
            self._steps_file.close()
            self._steps_file = self._steps_csv = None
        self._closed = True

    def __enter__(self) -> StatsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_runs(log_dir: str | Path, runs: Iterable, *, tensorboard: bool = True) -> list[Path]:
    """One log directory per finished run (``gaf train/compare`` results: ``label``,
    ``config["seed"]``, ``history``, ``distance_trace``) under ``log_dir``: ``epoch/<field>``
    per epoch and ``gaf/distance`` per step. Returns the directories."""
    root = Path(log_dir)
    written: list[Path] = []
    for run in runs:
        name = re.sub(r"[^A-Za-z0-9._=-]+", "_", f"{run.label}_seed{run.config.get('seed', 0)}")
        path, k = root / name, 1
        while path in written:
            k += 1
            path = root / f"{name}_{k}"
        with StatsLogger(path, tensorboard=tensorboard) as logger:
            for row in run.history:
                numbers = {key: value for key, value in row.items() if key != "epoch"
                           and isinstance(value, (int, float)) and not isinstance(value, bool)}
                logger.log_epoch(int(row["epoch"]), numbers)
            if logger.writer is not None:
                for step, distance in enumerate(run.distance_trace):
                    logger.writer.add_scalar(logger.prefix + "distance", float(distance), step)
        written.append(path)
    return written
