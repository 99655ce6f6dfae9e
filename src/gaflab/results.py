"""What one training run produced: :class:`RunResult`, stored in results.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

# Methods whose steps are decided by GAF's filter or by a blind control standing in for it:
# their summaries name the threshold and rule.
FILTERING_METHODS = ("gaf", "random-skip", "random-drop")
# Configuration fields that say how a run decides its steps or reports, not what it trains
# on: runs equal in everything else saw the same data, initial weights and micro-batches.
METHOD_FIELDS = frozenset({
    "method", "tau", "rule", "threshold", "measure", "control_rate", "control_rates",
    "match_per_epoch", "matched_to", "forget_rate", "forget_epochs", "gce_q", "patience",
    "name", "progress", "threads", "record_distances", "eval_batch_size", "collapse_margin",
    "acceptance_floor", "device",
})


def setting_key(config: dict[str, Any]) -> tuple:
    """What pairs runs for comparison: every setting but the method's (seed included)."""
    return tuple(sorted((k, repr(v)) for k, v in config.items() if k not in METHOD_FIELDS))


@dataclass
class RunResult:
    """Everything a run produced; ``to_dict`` is what results.json stores.

    ``warnings`` lists what the loop noticed (e.g. a collapse to chance accuracy), one dict
    per warning with the epoch, the kind, the figure and the printed message.
    """

    config: dict[str, Any]
    label: str
    history: list[dict[str, float]] = field(default_factory=list)
    distance_trace: list[float] = field(default_factory=list)  # per step, mean over rows
    num_params: int = 0
    steps: int = 0
    skipped_steps: int = 0
    noise_fraction: float = 0.0
    train_seconds: float = 0.0
    # CPU seconds of training (this process, every thread): what a step costs, whatever
    # else the machine runs.
    train_cpu_seconds: float = 0.0
    eval_seconds: float = 0.0
    warnings: list[dict[str, Any]] = field(default_factory=list)
    stopped_epoch: int | None = None  # early-stop: the epoch whose weights were kept
    # What it trained on: dataset, source directory, images used of each split, notes.
    data: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False, compare=False)  # not saved
    # The final gaf.NoiseScale.state_dict() (None: nothing measured); not saved either.
    noise_scale: dict | None = field(default=None, repr=False, compare=False)

    @property
    def final(self) -> dict[str, float]:
        """The reported epoch: the last one, or for early stopping the one it kept."""
        if not self.history:
            return {}
        if self.stopped_epoch is not None:
            return self.history[self.stopped_epoch - 1]
        return self.history[-1]

    @property
    def final_test_acc(self) -> float:
        return float(self.final.get("test_acc", float("nan")))

    @property
    def best_test_acc(self) -> float:
        return max((h["test_acc"] for h in self.history), default=float("nan"))

    @property
    def final_memorised(self) -> float:
        return float(self.final.get("memorised", float("nan")))

    @property
    def skip_rate(self) -> float:
        return self.skipped_steps / self.steps if self.steps else 0.0

    def mean_over_epochs(self, key: str) -> float:
        vals = [h.get(key) for h in self.history]
        finite = [float(v) for v in vals if v is not None and math.isfinite(v)]
        return float(np.mean(finite)) if finite else float("nan")

    def summary(self) -> dict[str, Any]:
        c = self.config
        filtering = c["method"] in FILTERING_METHODS
        return {
            "label": self.label,
            "method": c["method"],
            "tau": c["tau"] if filtering else None,
            "rule": c["rule"] if filtering else None,
            "noise": c["noise"],
            "noise_rate": c["noise_rate"],
            "seed": c["seed"],
            "final_test_acc": self.final_test_acc,
            "best_test_acc": self.best_test_acc,
            "final_memorised": self.final_memorised,
            "final_train_acc_clean": float(self.final.get("train_acc_clean", float("nan"))),
            "skip_rate": self.skip_rate,
            "distance_median": _median(self.distance_trace),
            # selection precision: mean over epochs, and the last epoch's
            "kept_noise_fraction": self.mean_over_epochs("kept_noise_fraction"),
            "dropped_noise_fraction": self.mean_over_epochs("dropped_noise_fraction"),
            "final_kept_noise_fraction": float(self.final.get("kept_noise_fraction", math.nan)),
            "final_dropped_noise_fraction": float(self.final.get("dropped_noise_fraction",
                                                                 math.nan)),
            "stopped_epoch": self.stopped_epoch,
            "warnings": len(self.warnings),
            "train_seconds": self.train_seconds,
            "train_cpu_seconds": self.train_cpu_seconds,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "config": self.config,
            "summary": self.summary(),
            "history": self.history,
            "distance_trace": [round(float(d), 5) for d in self.distance_trace],
            "num_params": self.num_params,
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "noise_fraction": self.noise_fraction,
            "train_seconds": self.train_seconds,
            "train_cpu_seconds": self.train_cpu_seconds,
            "eval_seconds": self.eval_seconds,
            "warnings": self.warnings,
            "stopped_epoch": self.stopped_epoch,
            "data": self.data,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        nan = float("nan")  # results.json stores NaN as null
        return cls(
            config=d["config"],
            label=d["label"],
            history=[{k: nan if v is None else v for k, v in h.items()} for h in d["history"]],
            distance_trace=[nan if v is None else v for v in d.get("distance_trace", [])],
            num_params=d.get("num_params", 0),
            steps=d.get("steps", 0),
            skipped_steps=d.get("skipped_steps", 0),
            noise_fraction=d.get("noise_fraction", 0.0),
            train_seconds=d.get("train_seconds", 0.0),
            train_cpu_seconds=d.get("train_cpu_seconds", 0.0),
            eval_seconds=d.get("eval_seconds", 0.0),
            warnings=list(d.get("warnings", [])),
            stopped_epoch=d.get("stopped_epoch"),
            data=dict(d.get("data") or {}),
        )


def _median(xs: list[float]) -> float:
    finite = [x for x in xs if math.isfinite(x)]
    return float(np.median(finite)) if finite else float("nan")


def source_settings(c: dict[str, Any]) -> tuple:
    """The settings of noise per source (all None for other noise; absent in old results)."""
    if c.get("noise_sources") is None:
        return (None, None, None, None, None)
    return (c["noise_sources"], c["bad_sources"], c.get("source_noise_rate"),
            c.get("other_source_noise_rate"), c.get("source_batches", True))


def source_description(c: dict[str, Any]) -> str:
    """E.g. ' in 4/10 sources' for noise per source (micro-batches of one source each),
    ' in 4/10 sources, mixed micro-batches' for its control; '' for other noise."""
    if c.get("noise_sources") is None:
        return ""
    s = c["noise_sources"]
    bad = round(c["bad_sources"] * s)
    other = c.get("other_source_noise_rate") or 0.0
    rest = f", others {100 * other:g}%" if other else ""
    mixing = "" if c.get("source_batches", True) else ", mixed micro-batches"
    return f" in {bad}/{s} sources{rest}{mixing}"


def noise_text(c: dict[str, Any]) -> str:
    """The noise of a run's configuration in words, e.g. 'symmetric 40% in 4/10 sources'."""
    if c["noise"] == "human":
        return f"human {c.get('human_labels')}"
    if c["noise"] == "none":
        return "none"
    return f"{c['noise']} {100 * c['noise_rate']:g}%" + source_description(c)


def strict_json(obj: Any, indent: int | None = 1) -> str:
    """``obj`` as strict JSON text: NaN and inf written as null (:func:`jsonable`), and an
    error rather than a silent NaN if one slipped through. Every JSON file the lab writes
    goes through here."""
    return json.dumps(jsonable(obj), indent=indent, allow_nan=False)


def jsonable(x: Any) -> Any:
    """NaN/inf become null: JSON has no NaN, and strict parsers reject it."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x
