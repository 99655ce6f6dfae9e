"""GAF against its matched blind control and against averaging, paired by seed.

Runs of the same setting and seed see the same data, initial weights and micro-batches, so
the difference GAF − other is taken seed by seed and summarised by its mean and a 95%
t-interval over seeds (mean ± t_{0.975, n-1} · s / sqrt(n), s the standard deviation of
the per-seed differences). With one seed there is a difference but no interval.

Each GAF run (every GAF label: tau, threshold, rule) is compared with

* the blind controls matched to it (``matched_to``: the same number of steps or
  micro-batches, chosen at random), which isolates what the choice by agreement is worth;
* averaging on the same micro-batches.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from gaflab.results import RunResult, noise_text, setting_key

# Two-sided 95% quantiles of Student's t for 1 … 30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: table to 30 degrees of freedom, then the Cornish-Fisher expansion
    z + (z³ + z) / (4 df) (within 0.001 beyond 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df)


def t_interval(diffs: Sequence[float]) -> tuple[float, float, int]:
    """(mean, half width of the 95% t-interval, n) of paired differences; the half width
    is NaN with fewer than two finite differences."""
    xs = np.asarray([d for d in diffs if d is not None and math.isfinite(d)], dtype=float)
    n = int(xs.size)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(xs[0]), math.nan, 1
    half = t_quantile_975(n - 1) * float(xs.std(ddof=1)) / math.sqrt(n)
    return float(xs.mean()), half, n


def _without_seed(config: dict[str, Any]) -> tuple:
    return setting_key({k: v for k, v in config.items() if k != "seed"})


def comparisons(runs: Sequence[RunResult]) -> list[tuple[str, str, str, list[tuple]]]:
    """(gaf label, other label, kind, [(gaf run, other run) per seed]) for every GAF label
    and setting; kind is "control" or "average"."""
    by_key: dict[tuple, RunResult] = {}
    for r in runs:
        by_key[(r.label, setting_key(r.config))] = r
    out: dict[tuple, list[tuple]] = defaultdict(list)
    for g in runs:
        if g.config["method"] != "gaf":
            continue
        key = setting_key(g.config)
        for o in runs:
            c = o.config
            if setting_key(c) != key:
                continue
            if c["method"] == "average":
                kind = "average"
            elif c.get("matched_to") == g.label:
                kind = "control"
            else:
                continue
            out[(g.label, o.label, kind, _without_seed(g.config))].append((g, o))
    return [(gl, ol, kind, pairs) for (gl, ol, kind, _), pairs in out.items()]


def paired_differences(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """GAF − matched control and GAF − averaging, paired by seed, in points of accuracy
    (final and best test accuracy, memorised fraction), with 95% t-intervals."""
    rows = []
    for gaf_label, other, kind, pairs in comparisons(runs):
        pairs = sorted(pairs, key=lambda p: p[0].config["seed"])
        c = pairs[0][0].config
        row: dict[str, Any] = {
            "gaf": gaf_label, "versus": other, "kind": kind, "setting": noise_text(c),
            "noise": c["noise"], "noise_rate": c["noise_rate"],
            "seeds": [g.config["seed"] for g, _ in pairs],
        }
        for name, get in (("final_test_acc", lambda r: r.final_test_acc),
                          ("best_test_acc", lambda r: r.best_test_acc),
                          ("final_memorised", lambda r: r.final_memorised)):
            diffs = [100 * (get(g) - get(o)) for g, o in pairs]
            mean, half, n = t_interval(diffs)
            row[f"{name}_diff_points"] = mean
            row[f"{name}_ci95_points"] = half
            row[f"{name}_per_seed"] = diffs
            row["n"] = n
        rows.append(row)
    return rows


def epoch_differences(pairs: list[tuple], key: str = "test_acc") -> dict[str, list[float]]:
    """Per epoch: mean GAF − other of ``key`` in points and its 95% half width."""
    epochs = min(min(len(g.history), len(o.history)) for g, o in pairs)
    means, halves = [], []
    for e in range(epochs):
        mean, half, _ = t_interval([100 * (g.history[e][key] - o.history[e][key])
                                    for g, o in pairs])
        means.append(mean)
        halves.append(half)
    return {"epoch": list(range(1, epochs + 1)), "mean": means, "ci95": halves}


def format_difference(mean: float, half: float) -> str:
    if not math.isfinite(mean):
        return "–"
    if not math.isfinite(half):
        return f"{mean:+.1f}"
    return f"{mean:+.1f} ± {half:.1f}"
