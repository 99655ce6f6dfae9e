"""Faults survived: which aggregation rule trains through a faulty row, on one device.

N rows per step (N = 4 and 8), each the gradient of its own micro-batch of 16 Fashion-MNIST
training images, as N ranks with one micro-batch each would produce; f = 1 or 2 of them are
corrupted every step by :mod:`gaf.faults` (every kind). Each method turns the N rows into one
update through the library's own functions; SGD with momentum steps on it. Recorded per
run: final test accuracy, divergence (non-finite parameters or a final training loss above
10x the first), the share of the update's weight that came from faulty rows and how often
any faulty row got weight, and the median wall time of a whole step (forward, backward,
aggregation, optimizer) against plain averaging in the same configuration.

Run everything (writes results/fault-study/results.json and docs/fault-study.md)::

    gaf study faults

Rebuild the report from the raw results only::

    gaf study faults --report-only
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import gaf
from gaf.controls import RandomDrop
from gaf.core.coordinatewise import aggregate_coordinatewise
from gaf.faults import FAULT_KINDS, FaultInjector
from gaflab.data import load_dataset
from gaflab.models import MLP
from gaflab.results import strict_json

RESULTS = Path("results/fault-study/results.json")
REPORT = Path("docs/fault-study.md")

STEPS, ROW_SAMPLES, LR, MOMENTUM, TAU = 300, 16, 0.05, 0.9, 0.97
TRAIN, TEST = 12000, 2000
CONFIGS = ((4, 1), (4, 2), (8, 1), (8, 2))
METHODS = ("averaging", "gaf-mean", "gaf-consensus", "random-drop", "multi-krum",
           "geometric-median", "trimmed-mean", "median")
ANCHOR_METHODS = ("gaf-mean", "gaf-neighbours", "gaf-consensus", "multi-krum",
                  "geometric-median")


def available(names: tuple[str, ...]) -> tuple[str, ...]:
    """The methods among ``names`` that this build of gaf offers."""
    return tuple(m for m in names if not m.startswith("gaf-") or m.removeprefix("gaf-")
                 in gaf.RULES)


# -- aggregation: [N, P] rows → (direction or None to skip, weights [N]) -------------------


def krum_options(n: int, f: int) -> tuple[int, int]:
    """Krum tolerates f_K faults when n > 2 f_K + 2; below that (n = 4) it runs with the
    largest f_K allowed and still keeps n - f rows."""
    f_k = min(f, (n - 3) // 2)
    return f_k, n - f


def trim_for(n: int, f: int) -> int:
    return min(f, (n - 1) // 2)


def aggregate(method: str, rows: torch.Tensor, n: int, f: int, control: RandomDrop,
              drop_rate: float):
    if method == "averaging":  # what an all-reduce computes: no validity check
        return rows.mean(dim=0), np.full(n, 1.0 / n)
    if method.startswith("gaf-"):
        rule = method.removeprefix("gaf-")
        res = gaf.filter_gradients(rows, TAU, rule)
        return (None if res.skipped else res.grad), res.weights.numpy()
    if method == "random-drop":  # GAF's step with blind verdicts at GAF's rejection rate
        control.q = drop_rate
        res = gaf.filter_gradients(rows, TAU, "mean", verdicts=control.draw(n))
        return (None if res.skipped else res.grad), res.weights.numpy()
    if method in ("multi-krum", "geometric-median"):
        f_k, m = krum_options(n, f)
        options = {"f": f_k, "m": m} if method == "multi-krum" else None
        res = gaf.filter_gradients(rows, rule=method, rule_options=options)
        return (None if res.skipped else res.grad), res.weights.numpy()
    rule = "median" if method == "median" else "trimmed-mean"
    res = aggregate_coordinatewise(rows, rule, trim_for(n, f))
    return res.grad, res.weights.numpy()


# -- one run ---------------------------------------------------------------------------------


def load_data(data_dir: str | None = None):
    data = load_dataset("fashion-mnist", data_dir, download=False)
    def prep(images):
        return (images.float().div(255).flatten(1) - 0.2860) / 0.3530
    return (prep(data.train_images[:TRAIN]), data.train_labels[:TRAIN],
            prep(data.test_images[:TEST]), data.test_labels[:TEST])


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(64)  # 784-64-10: the same initial weights as Linear, ReLU, Linear


def run(data, method: str, n: int, faulty: list[int], kind: str | None, seed: int = 0,
        drop_rate: float = 0.0) -> dict:
    x_train, y_train, x_test, y_test = data
    model = make_model(seed)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    gen = torch.Generator().manual_seed(seed)
    control = RandomDrop(drop_rate, seed=seed)
    injector = FaultInjector.make(kind, faulty, seed=seed) if kind else None
    f = len(faulty)
    losses, times, skipped, faulty_share, faulty_kept, rejected = [], [], 0, [], 0, 0.0
    for _ in range(STEPS):
        idx = torch.randint(0, len(y_train), (n, ROW_SAMPLES), generator=gen)
        labels = y_train[idx]
        if injector is not None:
            labels = injector.corrupt_labels(labels.reshape(-1), n, 10).view(n, ROW_SAMPLES)
        start = time.perf_counter()
        rows, loss_sum = [], 0.0
        for k in range(n):
            opt.zero_grad(set_to_none=False)
            loss = nn.functional.cross_entropy(model(x_train[idx[k]]), labels[k])
            loss.backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in params]))
            loss_sum += loss.item()
        rows = torch.stack(rows)
        if injector is not None:
            injector.corrupt_rows(rows)
        direction, weights = aggregate(method, rows, n, f, control, drop_rate)
        if direction is None:
            skipped += 1
            rejected += 1.0
        else:  # rows after the first, the ones the paper's rule tests
            rejected += float((np.asarray(weights)[1:] == 0).mean())
            offset = 0
            for p in params:
                p.grad.copy_(direction[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            opt.step()
        times.append(time.perf_counter() - start)
        losses.append(loss_sum / n)
        if faulty:
            share = float(np.asarray(weights)[faulty].sum()) if direction is not None else 0.0
            faulty_share.append(share)
            faulty_kept += share > 0
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    with torch.no_grad():
        out = model(x_test)
    acc = float((out.argmax(1) == y_test).float().mean()) if finite else 0.1
    tail = statistics.fmean(losses[-20:])
    return {
        "method": method, "n": n, "faulty": faulty, "kind": kind, "seed": seed,
        "fault": injector.spec.to_dict() if injector else None,
        "accuracy": acc, "finite": finite,
        "diverged": (not finite) or not math.isfinite(tail) or tail > 10 * losses[0],
        "skip_rate": skipped / STEPS,
        "faulty_share": statistics.fmean(faulty_share) if faulty_share else 0.0,
        "faulty_kept_rate": faulty_kept / STEPS if faulty else 0.0,
        "step_ms": 1000 * statistics.median(times),
        "drop_rate": drop_rate,
        "rejected_rate": rejected / STEPS,  # of rows 2..N (skipped steps: all)
    }


def study(data_dir: str | None = None) -> dict:
    data = load_data(data_dir)
    runs = []
    cases = [(n, [], None) for n in sorted({n for n, _ in CONFIGS})]
    # The faulty rows are the last ones: never the paper's anchor (row 1).
    cases += [(n, list(range(n - f, n)), kind) for n, f in CONFIGS for kind in FAULT_KINDS]
    for n, faulty, kind in cases:
        rate = 0.0
        for method in available(METHODS):
            drop = rate if method == "random-drop" else 0.0
            r = run(data, method, n, faulty, kind, drop_rate=drop)
            if method == "gaf-mean":  # rows GAF rejected, for its blind control
                rate = r["rejected_rate"]
            runs.append(r)
            print(method, n, len(faulty), kind, f"{r['accuracy']:.3f}", flush=True)
    # The paper's anchor is row 1 (index 0): what a fault there does, and the remedies.
    for kind in ("sign-flip", "scale", "noise"):
        for method in available(ANCHOR_METHODS):
            r = run(data, method, 4, [0], kind)
            r["anchor_study"] = True
            runs.append(r)
            print("anchor", method, kind, f"{r['accuracy']:.3f}", flush=True)
    return {"settings": {"steps": STEPS, "row_samples": ROW_SAMPLES, "lr": LR,
                         "momentum": MOMENTUM, "tau": TAU, "train": TRAIN, "test": TEST,
                         "model": "MLP 784-64-10", "dataset": "fashion-mnist"},
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "platform": platform.platform(), "threads": torch.get_num_threads()},
            "runs": runs}


# -- the report ------------------------------------------------------------------------------

SHORT = {"averaging": "avg", "gaf-mean": "GAF", "gaf-consensus": "GAF-cons",
         "random-drop": "rand-drop", "multi-krum": "m-Krum", "geometric-median": "geo-med",
         "trimmed-mean": "trim", "median": "median", "gaf-neighbours": "GAF-nbrs"}


def _cell(r: dict) -> str:
    text = f"{100 * r['accuracy']:.1f}"
    return text + (" (div)" if r["diverged"] else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


SURVIVED_POINTS = 5


def _ratio(by: dict, method: str) -> float:
    per = [by[(n, f, k, method)]["step_ms"] / by[(n, f, k, "averaging")]["step_ms"]
           for (n, f, k, m) in by if m == method]
    return statistics.median(per)


def summary(by: dict, names: list[str]) -> list[list[str]]:
    """One row per method over the fault cells (the headline table)."""
    rows = []
    for m in names:
        cells = [r for (n, f, k, mm), r in by.items() if mm == m and f > 0]
        ok = sum(r["accuracy"] >= by[(r["n"], 0, None, "averaging")]["accuracy"]
                 - SURVIVED_POINTS / 100 for r in cells)
        rows.append([SHORT[m], f"{ok}/{len(cells)}", str(sum(r["diverged"] for r in cells)),
                     f"{100 * statistics.fmean(r['accuracy'] for r in cells):.1f}",
                     f"{100 * statistics.fmean(r['faulty_share'] for r in cells):.1f}",
                     f"{_ratio(by, m):.2f}"])
    return rows


def reading(by: dict, names: list[str], results: dict) -> list[str]:
    """What the tables say, with every figure read from the results."""
    def acc(n, f, kind, m):
        return f"{100 * by[(n, f, kind, m)]['accuracy']:.1f}%"

    def share(n, f, kind, m):
        return f"{100 * by[(n, f, kind, m)]['faulty_share']:.1f}%"

    cells = [key for key in by if key[1] > 0]
    div = {m: sum(by[k]["diverged"] for k in cells if k[3] == m) for m in names}
    anchor = {(r["kind"], r["method"]): r for r in results["runs"] if r.get("anchor_study")}
    lines = [
        "## Reading",
        "",
        f"* Plain averaging diverged in {div['averaging']} of {len(cells) // len(names)} fault "
        "cells: one scaled, noisy or non-finite row per step is enough. Stale gradients, "
        "wrong labels and sign flips of fewer than half the rows only slow it down at this "
        "scale (half the rows flipped cancel the other half).",
        f"* Multi-Krum and the geometric median keep a scaled row's weight near zero ("
        f"{share(8, 1, 'scale', 'multi-krum')} and {share(8, 1, 'scale', 'geometric-median')} "
        f"at N = 8, f = 1; accuracy {acc(8, 1, 'scale', 'multi-krum')} and "
        f"{acc(8, 1, 'scale', 'geometric-median')} against {acc(8, 0, None, 'averaging')} "
        "without a fault). Where they fail, at N = 4 with f = 2, half the rows are faulty: "
        "past the breakdown point of any robust aggregator.",
    ]
    if "gaf-mean" in names:
        best_other = max(100 * by[(4, 2, "sign-flip", m)]["accuracy"]
                         for m in names if m != "gaf-mean")
        lines.append(
            f"* GAF's paper rule never diverged ({div['gaf-mean']} cells), but it is not a "
            "robust aggregator: a ×-10 row that slips past the test now and then costs "
            f"accuracy ({acc(8, 1, 'scale', 'gaf-mean')} at N = 8, f = 1; its weight "
            f"{share(8, 1, 'scale', 'gaf-mean')}). With an honest first row it holds against "
            f"half the rows flipped ({acc(4, 2, 'sign-flip', 'gaf-mean')} at N = 4, f = 2), "
            f"where no other method passes {best_other:.1f}%.")
    if "gaf-consensus" in names:
        lines.append(
            "* The consensus rule compares each row with the sum of the others, which a large "
            "faulty row dominates: under a noise fault it rejects the honest rows too "
            f"({acc(4, 1, 'noise', 'gaf-consensus')} at N = 4, f = 1), and two colluding "
            f"×-10 rows agree with each other's sum and are kept (weight "
            f"{share(4, 2, 'scale', 'gaf-consensus')} at N = 4, f = 2). It survives the faults "
            "that do not dominate the sum (NaN, stale, a sign flip of fewer than half the "
            "rows).")
    lines.append(
        "* Stale gradients are invisible to every rule (the stale rows keep about f/N of the "
        f"weight, e.g. {share(8, 2, 'stale', 'multi-krum')} for multi-Krum at N = 8, f = 2) "
        "and at this scale do little harm. A wrong-label shard is seen: multi-Krum gives it "
        f"{share(8, 1, 'wrong-labels', 'multi-krum')} of the weight at N = 8, f = 1, the "
        f"geometric median {share(8, 1, 'wrong-labels', 'geometric-median')}, GAF "
        f"{share(8, 1, 'wrong-labels', 'gaf-mean') if 'gaf-mean' in names else 'n/a'} "
        "(averaging 12.5%).")
    if anchor:
        kinds = sorted({k for k, _ in anchor}, key=FAULT_KINDS.index)

        def a(m):
            return " / ".join(f"{100 * anchor[(k, m)]['accuracy']:.1f}%" for k in kinds
                              if (k, m) in anchor)

        first = ", ".join(f"{k} {100 * anchor[(k, 'gaf-mean')]['skip_rate']:.0f}%"
                          for k in kinds)
        lines.append(
            "* A faulty first row breaks the paper's rule: every row is tested against a "
            f"running sum that starts at row 1, so the honest rows are rejected (steps "
            f"skipped: {first}) and the model does not learn. The remedy is a rule without "
            "a privileged row. `rule=\"multi-krum\"` and `rule=\"geometric-median\"` hold "
            f"against all three ({a('multi-krum')} and {a('geometric-median')}); "
            f"`rule=\"neighbours\"` (the anchor is the row with most neighbours) against the "
            f"sign flip and the noise but not the ×-10 row ({a('gaf-neighbours')}); the "
            f"consensus rule only partly ({a('gaf-consensus')}).")
    return lines


def report(results: dict) -> str:
    runs = [r for r in results["runs"] if not r.get("anchor_study")]
    names = [m for m in METHODS if any(r["method"] == m for r in runs)]
    by = {(r["n"], len(r["faulty"]), r["kind"], r["method"]): r for r in runs}
    s = results["settings"]
    out = [
        "# Faults survived: aggregation rules against faulty rows",
        "",
        "Generated by `gaf study faults` (raw results in `results/fault-study/results.json`;",
        "`gaf study faults --report-only` rebuilds this page from them).",
        "",
        f"Setting, at reduced scale: {s['dataset']}, {s['train']} training and {s['test']} test "
        f"images, {s['model']}, SGD lr {s['lr']} momentum {s['momentum']}, {s['steps']} steps;",
        f"every step N rows, each the gradient of its own {s['row_samples']} images (as N ranks "
        "with one micro-batch each); the last f rows are corrupted every step by "
        "`gaf.faults` (seed 0). One seed per cell.",
        f"GAF uses tau = {s['tau']}; random drop is GAF's step with blind verdicts "
        "(`gaf.controls.RandomDrop`): the anchor kept, each other row dropped at the rate "
        "GAF's paper rule rejected rows 2..N in the same cell; multi-Krum keeps N - f "
        "rows and tolerates f_K = min(f, (N - 3) // 2) (at N = 4 its guarantee allows "
        "only f_K = 0); the trimmed mean drops min(f, (N - 1) // 2) values per side.",
        "",
        "## Summary over the 24 fault cells (N = 4, 8; f = 1, 2; six kinds)",
        "",
        f"'survived': final test accuracy within {SURVIVED_POINTS} points of plain averaging "
        "without a fault at the same N.",
        "",
    ]
    out += _table(["method", "survived", "diverged", "mean accuracy %",
                   "weight to faulty rows %", "step time / averaging"],
                  summary(by, names))
    out += ["", *reading(by, names, results), "", "## Final test accuracy (%), `(div)` = diverged",
            ""]
    rows = []
    for n in sorted({r["n"] for r in runs}):
        rows.append([f"N={n}", "none"] + [_cell(by[(n, 0, None, m)]) for m in names])
    for n, f in CONFIGS:
        for kind in FAULT_KINDS:
            if (n, f, kind, names[0]) in by:
                rows.append([f"N={n} f={f}", kind] + [_cell(by[(n, f, kind, m)]) for m in names])
    out += _table(["rows", "fault"] + [SHORT[m] for m in names], rows)
    out += ["", "## Weight given to the faulty rows (% of the update, mean over steps)", "",
            "For averaging it is f/N by construction; GAF and Krum give whole rows weight "
            "or none; the geometric median gives every row some weight; for the coordinate-"
            "wise rules it is the share of kept coordinate values that came from faulty rows.",
            ""]
    rows = [[f"N={n} f={f}", kind] + [f"{100 * by[(n, f, kind, m)]['faulty_share']:.1f}"
                                      for m in names]
            for n, f in CONFIGS for kind in FAULT_KINDS if (n, f, kind, names[0]) in by]
    out += _table(["rows", "fault"] + [SHORT[m] for m in names], rows)
    out += ["", "## Cost per step against plain averaging (same configuration, median step "
            "time, ratio; median over the cells)", ""]
    out += _table([SHORT[m] for m in names], [[f"{_ratio(by, m):.2f}" for m in names]])
    out += ["", "Traffic across N ranks (m = 1 row each, P parameters, elements sent per "
            "rank): averaging by all-reduce and every Gram rule (GAF, multi-Krum, geometric "
            "median) through the sharded protocol 2·P·(N-1)/N; the coordinate-wise rules "
            "need an all-gather, (N-1)·P: N/2 times as much (2x at N = 4, 4x at N = 8).",
            "", "## A fault in the paper's anchor (row 1), N = 4, f = 1", ""]
    anchor = [r for r in results["runs"] if r.get("anchor_study")]
    kinds = sorted({r["kind"] for r in anchor}, key=FAULT_KINDS.index)
    amethods = [m for m in ANCHOR_METHODS if any(r["method"] == m for r in anchor)]
    ab = {(r["kind"], r["method"]): r for r in anchor}
    rows = [[k] + [f"{_cell(ab[(k, m)])}, skips {100 * ab[(k, m)]['skip_rate']:.0f}%"
                   for m in amethods] for k in kinds]
    out += _table(["fault in row 1"] + [SHORT[m] for m in amethods], rows)
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gaf study faults",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the report from the raw results only")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help=f"the raw results (default {RESULTS})")
    parser.add_argument("--report", type=Path, default=REPORT,
                        help=f"the page to write (default {REPORT})")
    parser.add_argument("--data-dir", default=None,
                        help="where Fashion-MNIST is (default: the lab's lookup, $GAF_DATA_DIR)")
    args = parser.parse_args(argv)
    if args.report_only:
        results = json.loads(args.results.read_text())
    else:
        torch.set_num_threads(1)
        results = study(args.data_dir)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(strict_json(results) + "\n")
    args.report.write_text(report(results))
    print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
