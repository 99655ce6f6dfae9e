"""Tables and plots for the thresholds/measures study from results.json.

    gaf study thresholds-report results/thresholds/results.json --out docs/study

Writes ``<results stem>-tables.md`` (the tables the report quotes) and PNG plots into
``--out`` (default ``docs/study``). Every number comes from the results file; nothing is
typed in by hand.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from gaflab.plots import pyplot

NOISE_ORDER = ["sym0", "sym20", "sym40", "sym60", "asym40"]


def aggregate(runs: list[dict]) -> dict:
    """(dataset, noise, method) -> mean/std over seeds of test_acc, memorised, skip_rate."""
    groups: dict = defaultdict(list)
    for r in runs:
        groups[(r["dataset"], r["noise"], r["method"])].append(r)
    out = {}
    for key, rs in groups.items():
        row = {"n": len(rs), "group": rs[0]["group"], "measure": rs[0]["measure"]}
        for metric in ("test_acc", "memorised", "skip_rate", "tau_mean"):
            vals = np.array([r[metric] for r in rs], dtype=float)
            row[metric] = float(np.mean(vals))
            row[metric + "_std"] = float(np.std(vals)) if len(vals) > 1 else 0.0
        out[key] = row
    return out


def _noises(agg, dataset):
    present = {k[1] for k in agg if k[0] == dataset}
    return [n for n in NOISE_ORDER if n in present] + sorted(present - set(NOISE_ORDER))


def best_fixed(agg, dataset, noise, methods):
    fixed = [m for m in methods if agg.get((dataset, noise, m), {}).get("group") == "fixed"]
    return max(fixed, key=lambda m: agg[(dataset, noise, m)]["test_acc"])


def tables(res: dict) -> str:
    agg = aggregate(res["runs"])
    methods = [m["name"] for m in res["methods"]]
    datasets = list(dict.fromkeys(r["dataset"] for r in res["runs"]))
    lines = []
    for ds in datasets:
        noises = _noises(agg, ds)
        seeds = sorted({r["seed"] for r in res["runs"] if r["dataset"] == ds})
        for metric, title, scale in (
            ("test_acc", "final test accuracy, %", 100),
            ("memorised", "memorised noisy training labels, %", 100),
            ("skip_rate", "skipped steps, %", 100),
        ):
            lines.append(f"\n#### {ds}: {title} (mean ± std over seeds {seeds})\n")
            lines.append("| method | " + " | ".join(noises) + " |")
            lines.append("|---|" + "---|" * len(noises))
            for m in methods:
                cells = []
                for n in noises:
                    a = agg.get((ds, n, m))
                    if a is None or (metric == "memorised" and np.isnan(a[metric])):
                        cells.append("–")
                        continue
                    cell = f"{scale * a[metric]:.1f} ± {scale * a[metric + '_std']:.1f}"
                    if metric == "test_acc" and m == best_fixed(agg, ds, n, methods):
                        cell = f"**{cell}**"
                    cells.append(cell)
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append(target_table(agg, methods, datasets))
    return "\n".join(lines) + "\n"


def target_table(agg, methods, datasets) -> str:
    """The issue's target: within 1 point of the best fixed tau, skipping fewer steps."""
    lines = ["\n#### Target check: accuracy gap to the best fixed tau (points) and skip rate "
             "(method's / best fixed's, %)\n"]
    cols = [(ds, n) for ds in datasets for n in _noises(agg, ds)]
    lines.append("| method | " + " | ".join(f"{ds} {n}" for ds, n in cols)
                 + " | within 1 point everywhere | and fewer skips everywhere |")
    lines.append("|---|" + "---|" * (len(cols) + 2))
    for m in methods:
        if agg[(cols[0][0], cols[0][1], m)]["group"] == "fixed":
            continue
        cells, close, fewer = [], True, True
        for ds, n in cols:
            bf = best_fixed(agg, ds, n, methods)
            a, b = agg[(ds, n, m)], agg[(ds, n, bf)]
            gap = 100 * (a["test_acc"] - b["test_acc"])
            close &= gap >= -1.0
            fewer &= a["skip_rate"] < b["skip_rate"] or b["skip_rate"] == 0 == a["skip_rate"]
            cells.append(f"{gap:+.1f} ({100 * a['skip_rate']:.0f}/{100 * b['skip_rate']:.0f})")
        lines.append(f"| {m} | " + " | ".join(cells)
                     + f" | {'yes' if close else 'no'} | {'yes' if close and fewer else 'no'} |")
    lines.append("\n#### Summary over all columns: mean accuracy gap to the best fixed tau "
                 "(points), worst gap, mean skip rate (%)\n")
    lines.append("| method | mean gap | worst gap | mean skip | best fixed's mean skip |")
    lines.append("|---|---|---|---|---|")
    for m in methods:
        gaps = [100 * (agg[(ds, n, m)]["test_acc"]
                       - agg[(ds, n, best_fixed(agg, ds, n, methods))]["test_acc"])
                for ds, n in cols]
        skips = [100 * agg[(ds, n, m)]["skip_rate"] for ds, n in cols]
        bskips = [100 * agg[(ds, n, best_fixed(agg, ds, n, methods))]["skip_rate"]
                  for ds, n in cols]
        lines.append(f"| {m} | {np.mean(gaps):+.1f} | {min(gaps):+.1f} | {np.mean(skips):.0f} "
                     f"| {np.mean(bskips):.0f} |")
    lines.append("\nBest fixed tau per column (highest mean test accuracy among the fixed grid, "
                 "tau = 2 is plain averaging): "
                 + "; ".join(f"{ds} {n}: {best_fixed(agg, ds, n, methods)}" for ds, n in cols))
    return "\n".join(lines)


def plots(res: dict, out: Path, prefix: str = "") -> list[str]:
    plt = pyplot()

    agg = aggregate(res["runs"])
    methods = [m["name"] for m in res["methods"]]
    datasets = list(dict.fromkeys(r["dataset"] for r in res["runs"]))
    written = []
    style = {"fixed": "-", "adaptive": "--", "measure": ":", "control": "-."}
    group = {m["name"]: m["group"] for m in res["methods"]}
    for ds in datasets:
        noises = _noises(agg, ds)
        fig, axes = plt.subplots(1, 3, figsize=(17, 5))
        for ax, metric, title in zip(axes, ("test_acc", "memorised", "skip_rate"),
                                     ("test accuracy", "memorised noisy labels", "skip rate"),
                                     strict=True):
            x = np.arange(len(noises))
            for m in methods:
                ys = [100 * agg[(ds, n, m)][metric] if (ds, n, m) in agg else np.nan
                      for n in noises]
                ax.plot(x, ys, style[group[m]], marker="o", ms=3, label=m)
            ax.set_xticks(x, noises)
            ax.set_title(f"{ds}: {title} (%)")
            ax.grid(alpha=0.3)
        axes[-1].legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        path = out / f"{prefix}{ds}-by-noise.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path.name)
    # tau over training at 40% symmetric noise, seed-averaged
    hist = res.get("history", [])
    for ds in datasets:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        for ax, noise in zip(axes, ("sym0", "sym40"), strict=True):
            for m in methods:
                if group[m] == "fixed" and m != "fixed 0.97":
                    continue
                rows = [h for h in hist if h["dataset"] == ds and h["noise"] == noise
                        and h["method"] == m]
                if not rows:
                    continue
                epochs = sorted({h["epoch"] for h in rows})
                taus = [np.mean([h["tau_mean"] for h in rows if h["epoch"] == e]) for e in epochs]
                ax.plot(epochs, taus, style[group[m]], marker="o", ms=3, label=m)
            p50 = [h for h in hist if h["dataset"] == ds and h["noise"] == noise
                   and h["method"] == "average (tau=2)"]
            if p50:
                epochs = sorted({h["epoch"] for h in p50})
                for key, ls in (("dist_p10", "-."), ("dist_p50", "-"), ("dist_p90", "-.")):
                    ax.plot(epochs, [np.mean([h[key] for h in p50 if h["epoch"] == e])
                                     for e in epochs], ls, color="grey", lw=1,
                            label=f"averaging: distance {key[5:]}")
            ax.set_ylim(0.5, 1.3)
            ax.set_title(f"{ds}, {noise}: mean tau in the epoch (seed mean)")
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        path = out / f"{prefix}{ds}-tau-over-training.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path.name)
    return written


def scatter(files: list[Path], out: Path) -> Path:
    """Accuracy against skip rate under 40% and 60% symmetric noise, every method and seed
    mean, from several results files: does accuracy follow the number of skipped steps?"""
    plt = pyplot()

    marker = {"fixed": "o", "adaptive": "^", "measure": "s", "control": "x"}
    datasets = ["fashion-mnist", "mnist"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    for f in files:
        res = json.loads(f.read_text())
        agg = aggregate(res["runs"])
        group = {m["name"]: m["group"] for m in res["methods"]}
        for (ds, noise, m), a in agg.items():
            if noise not in ("sym40", "sym60") or ds not in datasets:
                continue
            ax = axes[datasets.index(ds), ("sym40", "sym60").index(noise)]
            ax.scatter(100 * a["skip_rate"], 100 * a["test_acc"], marker=marker[group[m]],
                       color="C3" if group[m] == "control" else "C0" if group[m] == "fixed"
                       else "C2" if group[m] == "adaptive" else "C1")
            ax.annotate(f"{m} [{f.stem}]", (100 * a["skip_rate"], 100 * a["test_acc"]),
                        fontsize=6, alpha=0.8)
            ax.set_title(f"{ds}, {noise}: test accuracy vs skipped steps (seed means)")
            ax.set_xlabel("skipped steps (%)")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "accuracy-vs-skip.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gaf study thresholds-report",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("results")
    ap.add_argument("--out", default="docs/study")
    ap.add_argument("--scatter", nargs="*", default=None,
                    help="results files to combine in accuracy-vs-skip.png")
    args = ap.parse_args(argv)
    res = json.loads(Path(args.results).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.results).stem
    (out / f"{stem}-tables.md").write_text(tables(res))
    for name in plots(res, out, prefix=f"{stem}-"):
        print("wrote", out / name)
    print("wrote", out / f"{stem}-tables.md")
    if args.scatter:
        print("wrote", scatter([Path(f) for f in args.scatter], out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
