"""Tables and plots of the agreement study, from its raw results alone.

    gaf study agreement-report     # reads results/agreement/raw/*.json, writes
                                   # docs/agreement/tables.md and docs/agreement/*.png

Every number is a mean over seeds with a 95% t-interval; differences (GAF − its matched
blind control, GAF − averaging, ...) are paired by seed: the two copies of a pair started
from the same weights and saw the same micro-batches.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from gaflab.plots import pyplot

# 0.975 quantiles of Student's t for 1..30 degrees of freedom.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def interval(xs: list[float]) -> tuple[float, float, int]:
    """Mean and 95% half-width (t-interval) of finite values."""
    v = np.array([x for x in xs if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    if len(v) == 1:
        return float(v[0]), float("nan"), 1
    half = T975[min(len(v) - 1, 30) - 1] * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(half), len(v)


def fmt(mean: float, half: float, scale: float = 100.0, signed: bool = False) -> str:
    if not math.isfinite(mean):
        return "–"
    s = f"{mean * scale:+.1f}" if signed else f"{mean * scale:.1f}"
    return s + (f" ± {half * scale:.1f}" if math.isfinite(half) else "")


def load(raw: Path) -> list[dict]:
    """Every setting's results; supplements (``<key>.<copies>.json``) join their setting."""
    by_key: dict[str, dict] = {}
    for path in sorted(raw.glob("*.json"), key=lambda p: (p.name.count("."), p.name)):
        res = json.loads(path.read_text())
        if res["key"] in by_key:
            by_key[res["key"]]["history"] += res["history"]
        else:
            by_key[res["key"]] = res
    return list(by_key.values())


def group_key(res: dict) -> tuple:
    s = res["setting"]
    return (s["dataset"], s["noise"], f"{s['m']}x{s['b']}", s["grouping"])


def final_metrics(res: dict) -> dict[str, dict]:
    """Per copy: final, best and last-3-evaluations test accuracy, early stopping, etc."""
    by_copy: dict[str, list[dict]] = defaultdict(list)
    for h in res["history"]:
        by_copy[h["copy"]].append(h)
    out = {}
    for name, rows in by_copy.items():
        evals = [h for h in rows if "test_acc" in h]
        last = evals[-1]
        stop = max(evals, key=lambda h: h["heldout_noisy_acc"])  # first maximum
        epochs = len(rows)
        late = rows[epochs // 2:]  # second half of training, for selection precision

        def mean_of(key, rs=late):
            vals = [h[key] for h in rs if key in h and h[key] is not None
                    and math.isfinite(h[key])]
            return float(np.mean(vals)) if vals else float("nan")

        out[name] = {
            "final": last["test_acc"],
            "best": max(h["test_acc"] for h in evals),
            "last3": float(np.mean([h["test_acc"] for h in evals[-3:]])),
            "early_stop": stop["test_acc"],
            "memorised": last["memorised"],
            "skip": float(np.mean([h["skip_rate"] for h in rows])),
            "kept_noise": mean_of("kept_noise_fraction", rows),
            "dropped_noise": mean_of("dropped_noise_fraction", rows),
            "chance": mean_of("chance_spread", rows),
            "kept_noise_late": mean_of("kept_noise_fraction"),
            "dropped_noise_late": mean_of("dropped_noise_fraction"),
            "spearman": mean_of("distance_noise_spearman", rows),
            "collapsed": last["train_acc_observed"] < 0.15,
        }
    return out


def method_table(results: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[group_key(r)].append(r)
    lines = []
    for key in sorted(groups):
        runs = groups[key]
        seeds = sorted(r["setting"]["seed"] for r in runs)
        per_seed = [final_metrics(r) for r in runs]
        names = list(per_seed[0])
        lines.append(f"\n### {key[0]}, {key[1]}, {key[2]} micro-batches, grouping {key[3]} "
                     f"(seeds {', '.join(map(str, seeds))})\n")
        lines.append("| method | final test % | best % | mean of last 3 evals % | early stop % "
                     "| memorised % | skipped steps % | kept: noisy % | dropped: noisy % "
                     "| chance spread (pts) | rank corr. distance~noise |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for name in names:
            col = {k: interval([m[name][k] for m in per_seed if name in m])
                   for k in per_seed[0][name] if k != "collapsed"}
            collapsed = sum(m[name]["collapsed"] for m in per_seed if name in m)
            flag = f" (collapsed in {collapsed})" if collapsed else ""
            lines.append(
                f"| {name}{flag} | {fmt(*col['final'][:2])} | {fmt(*col['best'][:2])} | "
                f"{fmt(*col['last3'][:2])} | {fmt(*col['early_stop'][:2])} | "
                f"{fmt(*col['memorised'][:2])} | {fmt(*col['skip'][:2])} | "
                f"{fmt(*col['kept_noise'][:2])} | {fmt(*col['dropped_noise'][:2])} | "
                f"{fmt(*col['chance'][:2])} | "
                + (f"{col['spearman'][0]:.2f}" if math.isfinite(col['spearman'][0]) else "–")
                + " |")
        lines.append("")
        lines.append("Paired differences (points of test accuracy, mean ± 95% interval over "
                     "seeds):\n")
        lines.append("| comparison | final | best | mean of last 3 evals |")
        lines.append("|---|---|---|---|")
        for a, b in comparisons(names):
            d = {k: interval([m[a][k] - m[b][k] for m in per_seed if a in m and b in m])
                 for k in ("final", "best", "last3")}
            lines.append(f"| {a} − {b} | {fmt(*d['final'][:2], signed=True)} | "
                         f"{fmt(*d['best'][:2], signed=True)} | "
                         f"{fmt(*d['last3'][:2], signed=True)} |")
    return "\n".join(lines)


def comparisons(names: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for n in names:
        if n.startswith("gaf") and f"control:{n}" in names:
            pairs.append((n, f"control:{n}"))
    for n in names:
        if n.startswith("gaf"):
            pairs.append((n, "average"))
    for other in ("small-loss", "gce"):
        if other in names:
            pairs.append(("gaf 0.97", other)) if "gaf 0.97" in names else None
    return pairs


def headline(results: list[dict]) -> str:
    """One row per setting group: GAF − control and GAF − average, final accuracy."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[group_key(r)].append(r)
    lines = ["| data, noise, M×b, grouping | seeds | GAF final % | GAF − matched control "
             "| GAF − averaging | small-loss − GAF | kept noisy %: GAF / control / small-loss |",
             "|---|---|---|---|---|---|---|"]
    for key in sorted(groups):
        per_seed = [final_metrics(r) for r in groups[key]]
        g, c = "gaf 0.97", "control:gaf 0.97"

        def diff(a, b, k="final", per_seed=per_seed):
            return fmt(*interval([m[a][k] - m[b][k] for m in per_seed])[:2], signed=True)

        kept = " / ".join(fmt(interval([m[n]["kept_noise"] for m in per_seed])[0], float("nan"))
                          for n in (g, c, "small-loss"))
        lines.append(f"| {', '.join(key)} | {len(per_seed)} | "
                     f"{fmt(*interval([m[g]['final'] for m in per_seed])[:2])} | "
                     f"{diff(g, c)} | {diff(g, 'average')} | {diff('small-loss', g)} | {kept} |")
    return "\n".join(lines)


def curve_name(key: tuple) -> str:
    return "curves-" + "-".join(key).replace(" ", "") + ".png"


def plots(results: list[dict], out: Path) -> list[str]:
    try:
        plt = pyplot()
    except ImportError:  # tables without figures
        return []
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[group_key(r)].append(r)
    written = []
    for key, runs in sorted(groups.items()):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        names = sorted({h["copy"] for h in runs[0]["history"]})
        for name in names:
            ep, acc, kept, drop = [], [], [], []
            for e in sorted({h["epoch"] for h in runs[0]["history"]}):
                rows = [h for r in runs for h in r["history"] if h["copy"] == name
                        and h["epoch"] == e]
                if rows and "test_acc" in rows[0]:
                    ep.append(e)
                    acc.append(np.mean([h["test_acc"] for h in rows]) * 100)
                if rows and "kept_noise_fraction" in rows[0]:
                    kept.append((e, np.mean([h["kept_noise_fraction"] for h in rows]) * 100))
                    d = [h["dropped_noise_fraction"] for h in rows
                         if h["dropped_noise_fraction"] is not None
                         and math.isfinite(h["dropped_noise_fraction"])]
                    drop.append((e, np.mean(d) * 100 if d else np.nan))
            line, = ax1.plot(ep, acc, label=name)
            if kept:
                ax2.plot(*zip(*kept), color=line.get_color(), label=f"{name} kept")
                ax2.plot(*zip(*drop), color=line.get_color(), ls="--")
        ax1.set(xlabel="epoch", ylabel="test accuracy % (seed mean)", title=", ".join(key))
        ax2.set(xlabel="epoch", ylabel="noisy % (solid: kept, dashed: dropped)",
                title="what each method keeps")
        ax1.legend(fontsize=7)
        ax2.legend(fontsize=7)
        fig.tight_layout()
        name = curve_name(key)
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        written.append(name)
    return written


def tables(results: list[dict], plot_names: list[str]) -> str:
    """The text of tables.md."""
    text = ["# Agreement study: tables", "",
            "Generated by `gaf study agreement-report` from `results/agreement/raw/*.json` "
            f"({len(results)} settings × seeds). Mean ± 95% t-interval over seeds.", "",
            "## Headline", "", headline(results), "", "## Every method", method_table(results)]
    if plot_names:
        text += ["", "## Curves", ""] + [f"![{n}]({n})" for n in plot_names]
    return "\n".join(text) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gaf study agreement-report",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--raw", default="results/agreement/raw")
    ap.add_argument("--out", default="docs/agreement")
    args = ap.parse_args(argv)
    out = Path(args.out)
    results = load(Path(args.raw))
    if not results:
        raise SystemExit(f"no raw results in {args.raw}: run `gaf study agreement`")
    names = plots(results, out)
    (out / "tables.md").write_text(tables(results, names))
    print(f"wrote {out / 'tables.md'} and {len(names)} plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
