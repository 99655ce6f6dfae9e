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

from gaf.experiments.results import RunResult


def environment() -> dict[str, Any]:
    import gaf

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
    path.write_text(json.dumps(_jsonable(doc), indent=1, allow_nan=False) + "\n")
    return path


def load_results(path: str | os.PathLike) -> tuple[dict[str, Any], list[RunResult]]:
    doc = json.loads(Path(path).read_text())
    return doc, [RunResult.from_dict(r) for r in doc["runs"]]


def _jsonable(x: Any) -> Any:
    """NaN/inf become null: JSON has no NaN, and strict parsers reject it."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


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
                *_source_settings(c))].append(r)
    rows = []
    for (label, noise, rate, human, *_), rs in groups.items():
        s = [r.summary() for r in rs]
        noise_s = f"{noise} {human}" if noise == "human" else (
            "none" if noise == "none" else f"{noise} {100 * rate:g}%")
        noise_s += _source_description(rs[0].config)
        rows.append([
            label,
            noise_s,
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


def _source_settings(c: dict[str, Any]) -> tuple:
    """The settings of noise per source (all None for other noise; absent in old results)."""
    if c.get("noise_sources") is None:
        return (None, None, None, None, None)
    return (c["noise_sources"], c["bad_sources"], c.get("source_noise_rate"),
            c.get("other_source_noise_rate"), c.get("source_batches", True))


def _source_description(c: dict[str, Any]) -> str:
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
                c["micro_batch_size"], c["num_micro_batches"], *_source_settings(c))

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


def describe_settings(runs: Sequence[RunResult]) -> str:
    c = runs[0].config
    parts = [
        f"dataset {c['dataset']} ({c['train_size'] or 'all'} training images)",
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
    cmp = gaf_vs_average(runs)
    if cmp:
        lines += ["## GAF against averaging on the same micro-batches", ""]
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
