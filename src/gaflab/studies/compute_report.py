"""Tables and figures of the compute study (``gaf study compute-report``), from its raw files.

Reads every ``*.json`` of the raw directory (written by ``gaf study compute``) and writes
``tables.md`` and the figures into ``--out``. Numbers are percentages; ``±`` is the 95%
t-interval over the reported seeds, and differences are paired by seed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from gaflab.paired import t_interval
from gaflab.plots import pyplot
from gaflab.studies.compute import GAF, METHODS, TUNE_SEED

LABELS = {"average": "averaging", GAF: "GAF (tau 0.97)", "random-skip": "blind control"}


def load_runs(raw: Path) -> list[dict]:
    """One flat record per run: the cell's setting plus the run's summary figures."""
    runs = []
    for path in sorted(raw.glob("*.json")):
        data = json.loads(path.read_text())
        cell = data["study"]["cell"]
        for run in data["runs"]:
            s, cfg, hist = run["summary"], run["config"], run["history"]
            steps = run["steps"]
            batch = cfg["micro_batch_size"] * cfg["num_micro_batches"]
            skip = s["skip_rate"] or 0.0
            runs.append({
                "noise": cell["noise"], "size": cell["size"], "lr": cell["lr"],
                "seed": cell["seed"], "method": cfg["method"],
                "final": _pct(s["final_test_acc"]), "best": _pct(s["best_test_acc"]),
                "memorised": _pct(s["final_memorised"]), "skip": 100 * skip,
                "samples": steps * batch, "used": steps * batch * (1 - skip),
                "cpu": run.get("train_cpu_seconds") or run["train_seconds"],
                "tag": cell.get("tag", ""),
                "history": hist,
            })
    return runs


def _pct(x) -> float:
    return math.nan if x is None else 100 * float(x)


def _mean_ci(values: list[float]) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    mean, half, _ = t_interval(values)
    return f"{mean:.1f} ± {half:.1f}"


def reported(runs: list[dict]) -> list[dict]:
    """The reported seeds' runs (not the tuning seed, not the noise-scale reruns)."""
    return [r for r in runs if r["seed"] != TUNE_SEED and not r["tag"]]


def by(runs, *keys):
    out = defaultdict(list)
    for r in runs:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def accuracy_table(runs: list[dict], noise: str) -> list[str]:
    rows = ["| b | method | lr | final test acc % | best test acc % | memorised % | skipped % "
            "| samples in updates | CPU s | seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    groups = by([r for r in reported(runs) if r["noise"] == noise], "size", "method")
    for (size, method) in sorted(groups, key=lambda k: (k[0], METHODS.index(k[1]))):
        g = groups[(size, method)]
        rows.append(
            f"| {size} | {LABELS[method]} | {g[0]['lr']:g} | {_mean_ci([r['final'] for r in g])} "
            f"| {_mean_ci([r['best'] for r in g])} | {_mean_ci([r['memorised'] for r in g])} "
            f"| {np.mean([r['skip'] for r in g]):.0f} | {np.mean([r['used'] for r in g]):,.0f} "
            f"| {np.mean([r['cpu'] for r in g]):.0f} | {len(g)} |")
    return rows


def paired(runs: list[dict], noise: str, a: str, b: str, key: str = "final",
           b_size: int | None = None) -> dict[int, tuple[float, float, int]]:
    """size → (mean, half-width, n) of a − b paired by seed (b at ``b_size`` if given)."""
    rep = [r for r in reported(runs) if r["noise"] == noise]
    index = {(r["size"], r["method"], r["seed"]): r[key] for r in rep}
    out = {}
    for size in sorted({r["size"] for r in rep}):
        diffs = [index[(size, a, s)] - index[(b_size or size, b, s)]
                 for (sz, m, s) in index if sz == size and m == a
                 and (b_size or size, b, s) in index]
        diffs = [d for d in diffs if math.isfinite(d)]
        if len(diffs) >= 2:
            out[size] = t_interval(diffs)
    return out


def best_average_size(runs: list[dict], noise: str) -> int | None:
    means = {size: np.mean([r["final"] for r in g])
             for (size, method), g in by([r for r in reported(runs) if r["noise"] == noise],
                                         "size", "method").items() if method == "average"}
    return max(means, key=means.get) if means else None


def paired_table(runs: list[dict], noise: str) -> list[str]:
    best = best_average_size(runs, noise)
    rows = [f"| b | GAF − control | GAF − averaging (same b) | GAF − averaging at its best b "
            f"({best}) | memorised: GAF − control |", "|---|---|---|---|---|"]
    vs_control = paired(runs, noise, GAF, "random-skip")
    vs_average = paired(runs, noise, GAF, "average")
    vs_best = paired(runs, noise, GAF, "average", b_size=best) if best else {}
    mem = paired(runs, noise, GAF, "random-skip", key="memorised")

    def cell(d, size):
        return f"{d[size][0]:+.1f} ± {d[size][1]:.1f}" if size in d else "–"

    for size in sorted(set(vs_control) | set(vs_average)):
        rows.append(f"| {size} | {cell(vs_control, size)} | {cell(vs_average, size)} "
                    f"| {cell(vs_best, size)} | {cell(mem, size)} |")
    return rows


def stability_table(runs: list[dict], noise: str) -> list[str]:
    tune = [r for r in runs if r["seed"] == TUNE_SEED and r["noise"] == noise]
    lrs = sorted({r["lr"] for r in tune})
    rows = ["| b | method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
            "|---|---|" + "---|" * len(lrs)]
    index = {(r["size"], r["method"], r["lr"]): r["final"] for r in tune}
    for size in sorted({r["size"] for r in tune}):
        for method in METHODS:
            values = [index.get((size, method, lr), math.nan) for lr in lrs]
            rows.append(f"| {size} | {LABELS[method]} | "
                        + " | ".join("–" if not math.isfinite(v) else f"{v:.1f}" for v in values)
                        + " |")
    return rows


def noise_scale_table(runs: list[dict], noise: str, tau: float = 0.97) -> list[str]:
    """Per b, from the GAF rerun that records it: B_simple at each epoch, the distance it
    forecasts for two micro-batches of b, B / (B + b), against the observed median, the
    skip rate, and b* = B (1 − tau) / tau, where the forecast meets tau."""
    scale = sorted((r for r in runs if r["tag"] == "scale" and r["noise"] == noise),
                   key=lambda r: r["size"])
    rows = ["| b | lr | B_simple per epoch | forecast D(b), last epoch | observed median D, "
            "last epoch | skipped %, first / last epoch | b* = B (1 − tau) / tau, last epoch |",
            "|---|---|---|---|---|---|---|"]
    for r in scale:
        hist = r["history"]
        # The lab writes NaN and inf as null; B is null where the forecast is 1: infinite.
        series = [h.get("b_simple") if h.get("b_simple") is not None
                  else (math.inf if h.get("distance_forecast") == 1.0 else math.nan)
                  for h in hist]
        if not series or any(math.isnan(v) for v in series):
            continue
        last = hist[-1]
        star = series[-1] * (1 - tau) / tau
        rows.append(
            f"| {r['size']} | {r['lr']:g} | {' / '.join(_big(v) for v in series)} "
            f"| {last['distance_forecast']:.3f} | {last['distance_p50']:.3f} "
            f"| {100 * hist[0]['skip_rate']:.0f} / {100 * last['skip_rate']:.0f} "
            f"| {_big(star, '.1f')} |")
    if len(rows) == 2:
        return []
    return rows + ["", "∞: the averaged |G|² estimate is ≤ 0 (the noise swamps the mean "
                   "gradient: B is beyond what the steps can measure)."]


def _big(value: float, fmt: str = ".0f") -> str:
    return "∞" if math.isinf(value) else format(value, fmt)


def figures(runs: list[dict], out: Path, noises: list[str]) -> list[str]:
    plt = pyplot()
    names = []
    for noise in noises:
        rep = [r for r in reported(runs) if r["noise"] == noise]
        if not rep:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for method in METHODS:
            g = by([r for r in rep if r["method"] == method], "size")
            sizes = sorted(k[0] for k in g)
            acc = [np.mean([r["final"] for r in g[(s,)]]) for s in sizes]
            used = [np.mean([r["used"] for r in g[(s,)]]) for s in sizes]
            cpu = [np.mean([r["cpu"] for r in g[(s,)]]) for s in sizes]
            for ax, x in zip(axes, (sizes, used, cpu), strict=True):
                ax.plot(x, acc, "o-", label=LABELS[method])
        for ax, xlabel in zip(axes, ("micro-batch size b (M = 2)", "samples in updates",
                                     "training CPU seconds"), strict=True):
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("final test accuracy %")
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle(f"compute study, {noise}: mean of the reported seeds")
        name = f"accuracy-{noise}.png"
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        names.append(name)
        tune = [r for r in runs if r["seed"] == TUNE_SEED and r["noise"] == noise]
        sizes = sorted({r["size"] for r in tune})
        fig, axes = plt.subplots(1, len(sizes), figsize=(3 * len(sizes), 3.2), sharey=True)
        for ax, size in zip(np.atleast_1d(axes), sizes, strict=True):
            for method in METHODS:
                pts = sorted((r["lr"], r["final"]) for r in tune
                             if r["size"] == size and r["method"] == method)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=LABELS[method])
            ax.set_xscale("log")
            ax.set_title(f"b = {size}")
            ax.set_xlabel("learning rate")
            ax.grid(alpha=0.3)
        np.atleast_1d(axes)[0].set_ylabel("final test accuracy % (tuning seed)")
        np.atleast_1d(axes)[0].legend(fontsize=7)
        name = f"stability-{noise}.png"
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        names.append(name)
    return names


def write_report(raw: Path, out: Path) -> Path:
    runs = load_runs(raw)
    if not runs:
        raise SystemExit(f"error: no raw results (*.json) in {raw}: run `gaf study compute`")
    out.mkdir(parents=True, exist_ok=True)
    noises = sorted({r["noise"] for r in runs})
    lines = [f"<!-- Generated by `gaf study compute-report --raw {raw} --out {out}`. -->", ""]
    for noise in noises:
        lines += [f"## {noise}", "", "### Reported seeds, at each method's tuned lr", "",
                  *accuracy_table(runs, noise), "", "### Paired by seed (final test accuracy, "
                  "points)", "", *paired_table(runs, noise), "",
                  "### Stability: final test accuracy at every lr of the grid (tuning seed "
                  f"{TUNE_SEED})", "", *stability_table(runs, noise), ""]
        scale = noise_scale_table(runs, noise)
        if scale:
            lines += ["### Gradient noise scale", "", *scale, ""]
    for name in figures(runs, out, noises):
        lines.append(f"![{name}]({name})")
    path = out / "tables.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gaf study compute-report", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--raw", default="results/compute-study/raw")
    ap.add_argument("--out", default="docs/compute")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    print(write_report(Path(args.raw), Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
