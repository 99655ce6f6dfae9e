"""The demo's claim, checked against its blind control: ``gaf compare --check``.

A GAF run "shows filtering" only if it beats the blind control that takes as many steps at
random (what the choice by agreement is worth) and, as the paper claims, averaging. The
goal, on final test accuracy averaged over seeds and paired by seed:

    GAF − matched control >= 2 points   and   GAF − averaging >= 5 points

The check reports what it found either way. ``--check`` fails (exit 1) only when the
comparison cannot be made: no matched control or no averaging run beside a GAF run, or a
non-finite accuracy. ``--require-goal`` also fails when the goal is not met.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from gaflab.paired import format_difference, paired_differences
from gaflab.results import RunResult

GOAL_OVER_CONTROL = 2.0
GOAL_OVER_AVERAGE = 5.0


def check_goal(runs: Sequence[RunResult]) -> dict[str, Any]:
    """Verdict per GAF label: the two seed-mean differences, their intervals, and whether
    each part of the goal is met; ``complete`` is False when a comparison is missing."""
    rows = paired_differences(runs)
    verdicts = []
    for gaf_label in sorted({r["gaf"] for r in rows}):
        mine = [r for r in rows if r["gaf"] == gaf_label]
        control = [r for r in mine if r["kind"] == "control"]
        average = [r for r in mine if r["kind"] == "average"]
        entry: dict[str, Any] = {"gaf": gaf_label, "complete": bool(control and average)}
        for name, found, goal in (("control", control, GOAL_OVER_CONTROL),
                                  ("average", average, GOAL_OVER_AVERAGE)):
            if not found:
                continue
            r = found[0]
            mean, half = r["final_test_acc_diff_points"], r["final_test_acc_ci95_points"]
            entry[f"vs_{name}"] = {"versus": r["versus"], "diff_points": mean,
                                   "ci95_points": half, "per_seed": r["final_test_acc_per_seed"],
                                   "goal_points": goal, "met": bool(mean >= goal)}
            if not math.isfinite(mean):
                entry["complete"] = False
        entry["met"] = entry["complete"] and all(
            entry[f"vs_{n}"]["met"] for n in ("control", "average"))
        verdicts.append(entry)
    return {"goal": f"GAF − matched control >= {GOAL_OVER_CONTROL:g} and GAF − averaging >= "
                    f"{GOAL_OVER_AVERAGE:g} points of final test accuracy (seed mean)",
            "verdicts": verdicts,
            "complete": bool(verdicts) and all(v["complete"] for v in verdicts),
            "met": bool(verdicts) and all(v["met"] for v in verdicts)}


def describe(verdict: dict[str, Any]) -> list[str]:
    lines = [f"check: goal {verdict['goal']}"]
    if not verdict["verdicts"]:
        lines.append("check: no GAF run to judge")
    for v in verdict["verdicts"]:
        parts = []
        for name in ("control", "average"):
            d = v.get(f"vs_{name}")
            if d is None:
                parts.append(f"no {name} run beside it")
                continue
            parts.append(f"− {d['versus']}: {format_difference(d['diff_points'], d['ci95_points'])}"
                         f" points (goal >= {d['goal_points']:+g}: "
                         f"{'met' if d['met'] else 'NOT met'})")
        lines.append(f"check: {v['gaf']} " + "; ".join(parts))
    if verdict["met"]:
        lines.append("check: goal met")
    elif verdict["complete"]:
        lines.append("check: goal NOT met: at this setting the gain is not shown to come from "
                     "the choice by agreement")
    else:
        lines.append("check FAILED: the comparison is incomplete")
    return lines
