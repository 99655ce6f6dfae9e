"""PNG plots of a comparison (matplotlib, imported lazily with the Agg backend)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gaflab.paired import comparisons, epoch_differences
from gaflab.results import RunResult, noise_text


def pyplot():
    """matplotlib's pyplot on the Agg backend, imported only when a figure is drawn: runs
    with plots off (``--no-plots``, the tests) need no matplotlib."""
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - matplotlib is in the lab extra
        raise ImportError(
            "plots need matplotlib: pip install 'gaf[lab]'"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Lay out, write as PNG and close a figure (closing frees it: runs draw many)."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def _colours(labels: Sequence[str]) -> dict[str, str]:
    palette = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
               "#17becf", "#7f7f7f", "#bcbd22"]
    uniq: list[str] = []
    for lab in labels:
        if lab not in uniq:
            uniq.append(lab)
    return {lab: palette[i % len(palette)] for i, lab in enumerate(uniq)}


def _series_label(r: RunResult, multi_noise: bool, multi_seed: bool) -> str:
    lab = r.label
    if multi_noise:
        lab += f", {100 * r.config['noise_rate']:g}% {r.config['noise']}"
    if multi_seed:
        lab += f", seed {r.config['seed']}"
    return lab


def plot_curves(runs: Sequence[RunResult], path: str | os.PathLike) -> Path:
    """Test accuracy and memorised fraction of noisy samples over epochs, one line per run."""
    plt = pyplot()
    colours = _colours([r.label for r in runs])
    multi_noise = len({r.config["noise_rate"] for r in runs}) > 1
    multi_seed = len({r.config["seed"] for r in runs}) > 1
    styles = ["-", "--", ":", "-."]
    rates = sorted({r.config["noise_rate"] for r in runs})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in runs:
        ep = [h["epoch"] for h in r.history]
        ls = styles[rates.index(r.config["noise_rate"]) % len(styles)] if multi_noise else "-"
        kw = dict(color=colours[r.label], ls=ls, lw=1.8, alpha=0.9,
                  label=_series_label(r, multi_noise, multi_seed))
        axes[0].plot(ep, [100 * h["test_acc"] for h in r.history], marker="o", ms=3, **kw)
        axes[1].plot(ep, [100 * _nan(h["memorised"]) for h in r.history], marker="o", ms=3, **kw)
        axes[2].plot(ep, [100 * h["train_acc_clean"] for h in r.history], marker="o", ms=3, **kw)
    axes[0].set_title("test accuracy")
    axes[1].set_title("memorised: noisy training labels predicted")
    axes[2].set_title("training accuracy on clean samples")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    c = runs[0].config
    fig.suptitle(f"{c['dataset']}, {c['model']}, "
                 + ("" if multi_noise else f"{100 * c['noise_rate']:g}% {c['noise']} noise, ")
                 + f"{c['num_micro_batches']}×{c['micro_batch_size']} micro-batches")
    return save_figure(fig, path)


def _nan(x: float | None) -> float:
    return float("nan") if x is None else x


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or x.size < window:
        return x
    k = np.ones(window) / window
    return np.convolve(x, k, mode="valid")


def plot_distances(runs: Sequence[RunResult], path: str | os.PathLike) -> Path:
    """Cosine distance between micro-gradients over training (moving average), with tau,
    and the distribution of per-step distances."""
    plt = pyplot()
    runs = [r for r in runs if r.distance_trace]
    colours = _colours([r.label for r in runs])
    multi_noise = len({r.config["noise_rate"] for r in runs}) > 1
    multi_seed = len({r.config["seed"] for r in runs}) > 1
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    taus = set()
    for r in runs:
        d = np.array([np.nan if v is None else v for v in r.distance_trace], dtype=float)
        d = d[np.isfinite(d)]
        if d.size == 0:
            continue
        window = max(1, d.size // 100)
        sm = smooth(d, window)
        x = np.arange(sm.size) + (window - 1) / 2
        lab = _series_label(r, multi_noise, multi_seed)
        axes[0].plot(x, sm, color=colours[r.label], lw=1.5, label=lab)
        axes[1].hist(d, bins=60, range=(max(0.0, d.min() - 0.02), min(2.0, d.max() + 0.02)),
                     histtype="step", color=colours[r.label], lw=1.5, density=True, label=lab)
        if r.config["method"] == "gaf":
            taus.add(r.config["tau"])
    for t in sorted(taus):
        for ax, fn in ((axes[0], "axhline"), (axes[1], "axvline")):
            getattr(ax, fn)(t, color="k", ls="--", lw=1)
    if taus:
        axes[0].text(0.01, 0.02, "dashed: tau", transform=axes[0].transAxes, fontsize=8)
    axes[0].set_title("cosine distance, micro-gradient vs running sum (moving average)")
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel("cosine distance")
    axes[1].set_title("per-step distances")
    axes[1].set_xlabel("cosine distance")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def plot_noise_sweep(runs: Sequence[RunResult], path: str | os.PathLike,
                     paper: dict[str, dict[float, float]] | None = None) -> Path | None:
    """Final test accuracy against noise rate per method (the paper's Figure 6 shape);
    ``paper`` maps a label to {rate: accuracy %} drawn as dashed reference lines."""
    rates = sorted({r.config["noise_rate"] for r in runs})
    if len(rates) < 2:
        return None
    plt = pyplot()
    colours = _colours([r.label for r in runs])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label in colours:
        pts = {}
        for r in runs:
            if r.label == label:
                pts.setdefault(r.config["noise_rate"], []).append(r.final_test_acc)
        xs = sorted(pts)
        ys = [100 * float(np.mean(pts[x])) for x in xs]
        ax.plot([100 * x for x in xs], ys, marker="o", color=colours[label], label=label)
    for i, (label, curve) in enumerate((paper or {}).items()):
        xs = sorted(curve)
        ax.plot([100 * x for x in xs], [curve[x] for x in xs], ls="--", marker="x", alpha=0.7,
                color=colours.get(label, "0.4" if i else "0.2"), label=f"paper: {label}")
    _finish_axes(ax, "label noise %", "final test accuracy %")
    return save_figure(fig, path)


def _finish_axes(ax, xlabel: str, ylabel: str, title: str | None = None,
                 legend_size: int = 8) -> None:
    if title:
        ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def plot_selection(runs: Sequence[RunResult], path: str | os.PathLike) -> Path | None:
    """Noise fraction of what each method kept (solid) and dropped (dashed) over epochs,
    with the training set's noise rate dotted; one colour per method, seeds averaged."""
    runs = [r for r in runs if any(np.isfinite(_nan(h.get("kept_noise_fraction")))
                                   for h in r.history)]
    if not runs:
        return None
    plt = pyplot()
    colours = _colours([r.label for r in runs])
    settings = sorted({noise_text(r.config) for r in runs})
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.2), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        group = [r for r in runs if noise_text(r.config) == setting]
        for label in dict.fromkeys(r.label for r in group):
            rs = [r for r in group if r.label == label]
            epochs = min(len(r.history) for r in rs)
            ep = np.arange(1, epochs + 1)
            for key, ls in (("kept_noise_fraction", "-"), ("dropped_noise_fraction", "--")):
                ys = _nanmean([[_nan(h.get(key)) for h in r.history[:epochs]] for r in rs])
                ax.plot(ep, 100 * ys, ls=ls, marker="o", ms=3, color=colours[label],
                        label=f"{label}, {key.split('_')[0]}")
        ax.axhline(100 * float(np.mean([r.noise_fraction for r in group])), color="k", ls=":",
                   lw=1)
        _finish_axes(ax, "epoch", "% noisy labels",
                     f"noise of kept (solid) and dropped (dashed): {setting}", 7)
    return save_figure(fig, path)


def plot_differences(runs: Sequence[RunResult], path: str | os.PathLike) -> Path | None:
    """GAF − matched control and GAF − averaging in test accuracy over epochs, paired by
    seed: the mean and its 95% t-interval (shaded, with two seeds or more)."""
    comps = comparisons(runs)
    if not comps:
        return None
    plt = pyplot()
    colours = _colours([f"{g} − {o}" for g, o, _, _ in comps])
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for g, o, _, pairs in comps:
        d = epoch_differences(pairs)
        name = f"{g} − {o}, {noise_text(pairs[0][0].config)}"
        mean, half = np.asarray(d["mean"]), np.asarray(d["ci95"])
        ax.plot(d["epoch"], mean, marker="o", ms=3, color=colours[f"{g} − {o}"], label=name)
        if np.isfinite(half).any():
            ax.fill_between(d["epoch"], mean - half, mean + half, alpha=0.15,
                            color=colours[f"{g} − {o}"])
    ax.axhline(0.0, color="k", lw=1)
    _finish_axes(ax, "epoch", "points",
                 "test accuracy difference, paired by seed (band: 95% interval)", 7)
    return save_figure(fig, path)


def _nanmean(rows: list[list[float]]) -> np.ndarray:
    """Column means over the finite entries; NaN (quietly) where a column has none."""
    x = np.asarray(rows, dtype=float)
    finite = np.isfinite(x)
    counts = finite.sum(axis=0)
    sums = np.where(finite, x, 0.0).sum(axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def plot_all(runs: Sequence[RunResult], out_dir: str | os.PathLike,
             paper: dict[str, dict[float, float]] | None = None) -> list[Path]:
    out_dir = Path(out_dir)
    paths = [plot_curves(runs, out_dir / "curves.png")]
    for extra in (plot_selection(runs, out_dir / "selection.png"),
                  plot_differences(runs, out_dir / "differences.png")):
        if extra is not None:
            paths.append(extra)
    if any(r.distance_trace for r in runs):
        paths.append(plot_distances(runs, out_dir / "distances.png"))
    sweep = plot_noise_sweep(runs, out_dir / "noise_sweep.png", paper)
    if sweep is not None:
        paths.append(sweep)
    return paths
