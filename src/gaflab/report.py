"""results.json and the markdown report of a comparison.

results.json holds, per run: its configuration, a summary (method, tau, noise, seed, final
and best test accuracy, final memorised fraction of noisy samples, skip rate, median
micro-gradient cosine distance), the per-epoch history and the per-step distance trace;
plus the versions and the machine the runs were made on.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gaf
from gaflab.paired import format_difference, paired_differences
from gaflab.results import RunResult, noise_text, source_settings, strict_json


def environment() -> dict[str, Any]:
    return {
        "gaf": getattr(gaf, "__version__", "?"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def write_results(path: str | os.PathLike, runs: Sequence[RunResult],
                  extra: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    doc = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["gaf", *sys.argv[1:]]),
        "environment": environment(),
        **(extra or {}),
        "runs": [r.to_dict() for r in runs],
    }
    path.write_text(strict_json(doc) + "\n")
    return path


def load_results(path: str | os.PathLike) -> tuple[dict[str, Any], list[RunResult]]:
    doc = json.loads(Path(path).read_text())
    return doc, [RunResult.from_dict(r) for r in doc["runs"]]


# --------------------------------------------------------------------------------------
# Tables


def _pct_pm(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f}"
    return f"{100 * np.mean(xs):.1f} ± {100 * np.std(xs, ddof=1):.1f}"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "–" if x is None or not math.isfinite(x) else format(x, fmt)


COLUMNS = (
    "run", "noise", "seeds", "final test acc %", "best test acc %",
    "memorised %", "clean train acc %", "skipped steps %", "median cos dist", "train s",
)


def summary_rows(runs: Sequence[RunResult]) -> list[list[str]]:
    """One row per (label, noise, rate), mean ± std over seeds."""
    groups: dict[tuple, list[RunResult]] = defaultdict(list)
    for r in runs:
        c = r.config
        groups[(r.label, c["noise"], c["noise_rate"], c.get("human_labels"),
                *source_settings(c))].append(r)
    rows = []
    for (label, *_), rs in groups.items():
        s = [r.summary() for r in rs]
        rows.append([
            label,
            noise_text(rs[0].config),
            ",".join(str(x["seed"]) for x in s),
            _pct_pm([x["final_test_acc"] for x in s]),
            _pct_pm([x["best_test_acc"] for x in s]),
            _pct_pm([x["final_memorised"] for x in s]),
            _pct_pm([x["final_train_acc_clean"] for x in s]),
            _pct_pm([x["skip_rate"] for x in s]),
            _num(float(np.mean([x["distance_median"] for x in s]))),
            f"{np.mean([x['train_seconds'] for x in s]):.0f}",
        ])
    return rows


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str] = COLUMNS,
                 markdown: bool = True) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r) for r in rows]
    return "\n".join(out)


def gaf_vs_average(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """For each GAF run, the averaging run with the same data settings and seed:
    the difference in final test accuracy (points) and the ratio of memorised fractions."""
    def key(r: RunResult) -> tuple:
        c = r.config
        return (c["dataset"], c["noise"], c["noise_rate"], c.get("human_labels"), c["seed"],
                c["micro_batch_size"], c["num_micro_batches"], *source_settings(c))

    baselines = {key(r): r for r in runs if r.config["method"] == "average"}
    out = []
    for r in runs:
        if r.config["method"] != "gaf" or key(r) not in baselines:
            continue
        b = baselines[key(r)]
        mem_ratio = (r.final_memorised / b.final_memorised
                     if b.final_memorised and math.isfinite(b.final_memorised) else float("nan"))
        out.append({
            "gaf": r.label,
            "noise": r.config["noise"],
            "noise_rate": r.config["noise_rate"],
            "seed": r.config["seed"],
            "test_acc_gain_points": 100 * (r.final_test_acc - b.final_test_acc),
            "memorised_ratio": mem_ratio,
        })
    return out


SELECTION_COLUMNS = (
    "run", "noise", "kept: noisy %", "dropped: noisy %", "chance ± (kept)",
    "taken steps: noisy %", "skipped steps: noisy %", "rank corr. distance ~ noise",
)


def _last_and_range(rs: Sequence[RunResult], key: str, scale: float = 100.0,
                    fmt: str = ".1f") -> str:
    """The last epoch's value (mean over seeds) and, in brackets, the range over every epoch
    and seed: e.g. '12.4 (12.1-39.9)'."""
    last = [float(r.history[-1].get(key, math.nan)) for r in rs if r.history]
    every = [float(h.get(key, math.nan)) for r in rs for h in r.history]
    last = [v for v in last if math.isfinite(v)]
    every = [v for v in every if math.isfinite(v)]
    if not every:
        return "–"
    head = format(scale * float(np.mean(last)), fmt) if last else "–"
    return f"{head} ({format(scale * min(every), fmt)}–{format(scale * max(every), fmt)})"


def selection_rows(runs: Sequence[RunResult]) -> list[list[str]]:
    """Selection precision per (label, noise): the last epoch (mean over seeds) and the range
    over epochs and seeds; runs that keep everything are left out (their fields are NaN)."""
    groups: dict[tuple, list[RunResult]] = defaultdict(list)
    for r in runs:
        if math.isfinite(r.mean_over_epochs("kept_noise_fraction")):
            groups[(r.label, noise_text(r.config))].append(r)
    rows = []
    for (label, noise), rs in groups.items():
        rows.append([
            label, noise,
            *(_last_and_range(rs, k) for k in (
                "kept_noise_fraction", "dropped_noise_fraction", "kept_noise_chance_std",
                "taken_noise_fraction", "skipped_noise_fraction")),
            _last_and_range(rs, "distance_noise_spearman", 1.0, "+.2f"),
        ])
    return rows


DIFFERENCE_COLUMNS = (
    "GAF run", "versus", "noise", "seeds", "final test acc, points", "best test acc, points",
    "memorised, points",
)


def difference_rows(runs: Sequence[RunResult]) -> list[list[str]]:
    rows = []
    for d in paired_differences(runs):
        rows.append([
            d["gaf"], d["versus"], d["setting"], ",".join(map(str, d["seeds"])),
            *(format_difference(d[f"{k}_diff_points"], d[f"{k}_ci95_points"])
              for k in ("final_test_acc", "best_test_acc", "final_memorised")),
        ])
    return rows


def method_sections(runs: Sequence[RunResult]) -> list[str]:
    """Markdown: paired differences, selection precision, method notes, warnings."""
    lines: list[str] = []
    diffs = difference_rows(runs)
    if diffs:
        lines += ["## GAF − matched control and GAF − averaging, paired by seed", "",
                  format_table(diffs, DIFFERENCE_COLUMNS), "",
                  "Mean over seeds of the per-seed difference (same data, weights and "
                  "micro-batches), ± the half width of its 95% t-interval (none with one "
                  "seed). A matched control takes GAF's steps (or micro-batches) at GAF's "
                  "rate, chosen at random: GAF − control is what the choice by agreement "
                  "is worth.", ""]
    sel = selection_rows(runs)
    if sel:
        lines += ["## What each method kept", "", format_table(sel, SELECTION_COLUMNS), "",
                  "Noise fraction of the samples that entered an update (*kept*: micro-"
                  "batches accepted in taken steps, or samples for small-loss) and of the "
                  "rest (*dropped*): the last epoch, mean over seeds, and in brackets the "
                  "range over epochs and seeds; *chance ±*: the standard deviation "
                  "a random choice of the same size shows; *taken/skipped steps*: noise of "
                  "whole steps; *rank corr.*: Spearman correlation of a micro-batch's "
                  "distance with its noise fraction.", ""]
    notes = []
    for r in runs:
        c = r.config
        if c["method"] == "small-loss":
            rate = max((h.get("forget_rate", 0.0) for h in r.history), default=0.0)
            source = "given" if c.get("forget_rate") is not None else \
                "the training set's known noise fraction"
            notes.append(f"{r.label} (seed {c['seed']}): forget rate {rate:.3g} ({source}), "
                         f"ramped over {c.get('forget_epochs')} epochs")
        if c["method"] == "early-stop":
            notes.append(f"{r.label} (seed {c['seed']}): kept epoch {r.stopped_epoch} "
                         f"(best accuracy on a {100 * c['holdout_fraction']:g}% held-out "
                         "split with noisy labels)")
        for w in r.warnings:
            notes.append(f"**warning**, {r.label} (seed {c['seed']}): {w['message']}")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in dict.fromkeys(notes)] + [""]
    return lines


def describe_settings(runs: Sequence[RunResult]) -> str:
    c = runs[0].config
    data = runs[0].data  # what the run really used (older results: the setting asked for)
    images = data.get("train_images", c["train_size"] or "all")
    source = f", from {data['source']}" if data.get("source") else ""
    parts = [
        f"dataset {c['dataset']} ({images} training images{source})",
        f"model {c['model']}",
        f"{c['num_micro_batches']} micro-batches of {c['micro_batch_size']}"
        + (" (class-balanced)" if c["class_balanced"] else ""),
        f"{c['epochs']} epochs",
        f"{c['optimizer']} lr {c['lr']:g}"
        + (f" momentum {c['momentum']:g}{' nesterov' if c['nesterov'] else ''}"
           if c["optimizer"] == "sgd" else "")
        + f" weight decay {c['weight_decay']:g}, {c['schedule']} schedule",
    ]
    return "; ".join(parts)


def markdown_report(runs: Sequence[RunResult], plots: Sequence[str] = (),
                    title: str = "GAF against averaging", wall_seconds: float | None = None,
                    notes: Sequence[str] = ()) -> str:
    lines = [f"# {title}", "", "Settings: " + describe_settings(runs) + ".", ""]
    lines += [format_table(summary_rows(runs)), ""]
    lines += [
        "*memorised*: fraction of the noisy training samples that the model predicts with "
        "their noisy label at the end of training. *skipped steps*: GAF steps where fewer "
        "than two micro-gradients agreed. *median cos dist*: median over steps of the cosine "
        "distance between a micro-gradient and the running sum of the earlier ones.",
        "",
    ]
    lines += method_sections(runs)
    cmp = gaf_vs_average(runs)
    if cmp:
        lines += ["## GAF against averaging on the same micro-batches, seed by seed", ""]
        lines += ["| GAF run | noise | seed | test acc gain (points) | memorised: GAF / average |",
                  "|---|---|---|---|---|"]
        for d in cmp:
            lines.append(
                f"| {d['gaf']} | {d['noise']} {100 * d['noise_rate']:g}% | {d['seed']} | "
                f"{d['test_acc_gain_points']:+.1f} | {_num(d['memorised_ratio'], '.2f')} |"
            )
        lines.append("")
    for p in plots:
        lines += [f"![{Path(p).stem}]({Path(p).name})", ""]
    if wall_seconds is not None:
        lines += [f"Wall time: {wall_seconds:.0f} s.", ""]
    env = environment()
    lines += [f"torch {env['torch']}, {env['cpu_count']} CPUs, {env['platform']}."]
    lines += list(notes)
    return "\n".join(lines) + "\n"
