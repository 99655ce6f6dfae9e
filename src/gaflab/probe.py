"""``gaf probe``: the paper's observations about micro-gradient agreement.

1. Over training: the cosine distance between micro-gradients, step by step (the trace the
   training loop records), which the paper finds stays high, about 0.9-1.0.
2. Against micro-batch size: at chosen epochs, for each size b, draw ``pairs`` pairs of
   disjoint random micro-batches of b samples, compute each one's gradient at the current
   weights and their cosine distance. Larger micro-batches agree more (their gradients
   average out more noise); the paper uses this to argue for a best micro-batch size.

Probing does not disturb training: it draws from its own random stream, and BatchNorm
running statistics are restored after the probe's forward passes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from gaf import FlatGradients, cosine_distance
from gaflab.config import TrainConfig
from gaflab.plots import pyplot, save_figure, smooth
from gaflab.prepare import PreparedData, prepare_data
from gaflab.report import environment
from gaflab.results import RunResult, strict_json
from gaflab.seeds import stream_seed
from gaflab.train import train


@dataclass
class ProbeConfig:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(method="average", epochs=6))
    sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    pairs: int = 16
    at_epochs: tuple[int, ...] | None = None  # default: start, middle, end

    def validate(self) -> ProbeConfig:
        self.train.validate()
        if not self.sizes:
            raise ValueError("probe needs at least one micro-batch size")
        for s in self.sizes:
            if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                raise ValueError(f"micro-batch sizes must be positive integers, got {s!r}")
        if not isinstance(self.pairs, int) or self.pairs < 1:
            raise ValueError(f"pairs must be a positive integer, got {self.pairs!r}")
        epochs = self.epochs_to_probe()
        bad = [e for e in epochs if not 0 <= e <= self.train.epochs]
        if bad:
            raise ValueError(f"probe epochs {bad} outside 0..{self.train.epochs}")
        return self

    def epochs_to_probe(self) -> tuple[int, ...]:
        if self.at_epochs is not None:
            return tuple(sorted(set(self.at_epochs)))
        e = self.train.epochs
        return tuple(sorted({0, e // 2, e}))


def micro_gradient_distances(
    model: nn.Module,
    data: PreparedData,
    sizes: Sequence[int],
    pairs: int,
    generator: torch.Generator,
) -> dict[int, list[float]]:
    """Cosine distances between the gradients of pairs of disjoint random micro-batches."""
    params = [p for p in model.parameters() if p.requires_grad]
    flat = FlatGradients(params)
    pair = flat.new_buffer(2)  # two rows reused for every pair
    saved_grads = [None if p.grad is None else p.grad.clone() for p in params]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    was_training = model.training
    model.train()
    n = data.train_y.numel()
    out: dict[int, list[float]] = {}
    for size in sizes:
        if 2 * size > n:
            raise ValueError(f"micro-batch size {size} needs {2 * size} samples, have {n}")
        ds = []
        for _ in range(pairs):
            idx = torch.randperm(n, generator=generator)[: 2 * size].to(data.train_x.device)
            for row, part in zip(pair, (idx[:size], idx[size:]), strict=True):
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(data.train_x[part]), data.train_y[part]).backward()
                flat.gather(row)
            ds.append(float(cosine_distance(pair[0], pair[1])))
        out[int(size)] = ds
    model.zero_grad(set_to_none=True)
    for p, g in zip(params, saved_grads, strict=True):
        p.grad = g
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    model.train(was_training)
    return out


@dataclass
class ProbeResult:
    run: RunResult
    by_size: dict[int, dict[int, list[float]]]  # epoch -> size -> distances
    config: dict[str, Any]

    def size_table(self) -> list[dict[str, Any]]:
        rows = []
        for epoch, per_size in sorted(self.by_size.items()):
            for size, ds in sorted(per_size.items()):
                a = np.asarray(ds, dtype=float)
                rows.append({"epoch": epoch, "micro_batch_size": size,
                             "mean": float(a.mean()), "std": float(a.std()),
                             "min": float(a.min()), "max": float(a.max())})
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "run": self.run.to_dict(),
            "by_size": self.size_table(),
            "distances": {str(e): {str(s): v for s, v in d.items()}
                          for e, d in self.by_size.items()},
        }


def run_probe(pcfg: ProbeConfig) -> ProbeResult:
    pcfg.validate()
    cfg = pcfg.train
    data = prepare_data(cfg)
    gen = torch.Generator().manual_seed(stream_seed(cfg.seed, "probe"))
    wanted = set(pcfg.epochs_to_probe())
    by_size: dict[int, dict[int, list[float]]] = {}

    def hook(epoch: int, model: nn.Module) -> None:
        if epoch in wanted:
            by_size[epoch] = micro_gradient_distances(model, data, pcfg.sizes, pcfg.pairs, gen)

    run = train(cfg, data, epoch_hook=hook)
    cfg_dict = asdict(pcfg)
    return ProbeResult(run, by_size, cfg_dict)


def write_probe(result: ProbeResult, out_dir: str | os.PathLike, plots: bool = True) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"environment": environment(), **result.to_dict()}
    (out / "probe.json").write_text(strict_json(doc) + "\n")
    outputs = {"results": str(out / "probe.json")}
    if plots:
        outputs["plot"] = str(plot_probe(result, out / "probe.png"))
    lines = ["# Micro-gradient agreement probe", "",
             f"Run: {result.run.label} on {result.run.config['dataset']}, "
             f"{result.run.config['noise']} noise {100 * result.run.config['noise_rate']:g}%, "
             f"{result.run.config['num_micro_batches']} micro-batches of "
             f"{result.run.config['micro_batch_size']}.", ""]
    trace = np.asarray([d for d in result.run.distance_trace if math.isfinite(d)])
    if trace.size:
        lines += [
            "Cosine distance between a step's micro-gradients during training: "
            f"median {np.median(trace):.3f}, 10th percentile {np.percentile(trace, 10):.3f}, "
            f"90th percentile {np.percentile(trace, 90):.3f} over {trace.size} steps.", ""]
    lines += ["| epoch | micro-batch size | mean distance | std | min | max |",
              "|---|---|---|---|---|---|"]
    for r in result.size_table():
        lines.append(f"| {r['epoch']} | {r['micro_batch_size']} | {r['mean']:.3f} | "
                     f"{r['std']:.3f} | {r['min']:.3f} | {r['max']:.3f} |")
    if plots:
        lines += ["", "![probe](probe.png)"]
    (out / "probe.md").write_text("\n".join(lines) + "\n")
    outputs["report"] = str(out / "probe.md")
    return outputs


def plot_probe(result: ProbeResult, path: str | os.PathLike) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    d = np.asarray([np.nan if v is None else v for v in result.run.distance_trace], dtype=float)
    d = d[np.isfinite(d)]
    if d.size:
        axes[0].plot(np.arange(d.size), d, lw=0.5, alpha=0.35, color="#1f77b4", label="per step")
        w = max(1, d.size // 50)
        sm = smooth(d, w)
        axes[0].plot(np.arange(sm.size) + (w - 1) / 2, sm, lw=2, color="#1f77b4",
                     label=f"moving average ({w} steps)")
    axes[0].set_title(f"cosine distance between micro-gradients ({result.run.label})")
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel("cosine distance")
    axes[0].legend(fontsize=8)
    cmap = plt.get_cmap("viridis")
    epochs = sorted(result.by_size)
    for i, epoch in enumerate(epochs):
        rows = [r for r in result.size_table() if r["epoch"] == epoch]
        xs = [r["micro_batch_size"] for r in rows]
        axes[1].errorbar(xs, [r["mean"] for r in rows], yerr=[r["std"] for r in rows],
                         marker="o", capsize=3, color=cmap(i / max(1, len(epochs) - 1)),
                         label=f"epoch {epoch}")
    axes[1].set_xscale("log", base=2)
    axes[1].set_title("distance between two micro-batches vs their size")
    axes[1].set_xlabel("micro-batch size")
    axes[1].set_ylabel("cosine distance (mean ± std)")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    return save_figure(fig, path)
