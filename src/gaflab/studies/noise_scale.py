"""Validation of :class:`gaf.NoiseScale` on the lab's small CNN and Fashion-MNIST.

The lab trains the small CNN (plain averaging, 2 micro-batches of 32, the lab's defaults
otherwise) on ``--train-size`` training images. Before training and after the epochs in
``--at``, with the weights frozen, it measures:

(b) the noise scale three ways:

    exact       from the per-sample gradients g_s of all N training images (torch.func
                vmap, streamed in chunks, never held at once): S1 = Σ g_s, S2 = Σ |g_s|²,
                ḡ = S1 / N,

                    tr(Σ) = (S2 - N |ḡ|²) / (N - 1)          (the sample covariance's trace)
                    |G|²  = |ḡ|² - tr(Σ) / N                 (E|ḡ|² = |G|² + tr(Σ)/N)
                    B     = tr(Σ) / |G|²

                both unbiased for the distribution the N images are drawn from; micro-batches
                drawn without replacement from these N images make NoiseScale's per-step
                estimates unbiased for exactly these two numbers;
    frozen      gaf.NoiseScale (default beta) fed ``--steps`` steps of micro-batch Gram
                matrices at the frozen weights, for each micro-batch layout in ``LAYOUTS``;
    training    the b_simple that ``gaf train`` wrote into the epoch's history (the moving
                model's estimate, an exponential average over the last ~200 steps).

(c) the forecast: for b in ``SIZES``, ``--pairs`` pairs of disjoint micro-batches of b
    images; the median cosine distance between the two micro-gradients against
    D(b) = B / (B + b) (B exact), and the skip rate of the paper's rule at tau (M = 2:
    skipped when D > tau) against the forecast crossing b* = B (1 - tau) / tau.

Raw results: ``results/noise-scale/validation.json``; ``--report-only`` rebuilds
``results/noise-scale/tables.md`` from it (the tables of docs/noise-scale.md).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F  # noqa: N812

import gaf
from gaflab.config import TrainConfig
from gaflab.prepare import prepare_data
from gaflab.studies.common import versions
from gaflab.train import train

OUT = Path("results/noise-scale")
LAYOUTS = {"2 x 32": [32, 32], "4, 8, 16, 32": [4, 8, 16, 32]}
SIZES = (4, 8, 16, 32, 64, 128)
COMMAND = "gaf study noise-scale"


def flat_params(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def exact_noise_scale(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 250) -> dict:
    """tr(Σ), |G|² and B from every sample's gradient (module docstring), float64 sums."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss_one(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    s1, s2 = None, 0.0
    for i in range(0, x.shape[0], chunk):
        g = per_sample(params, x[i : i + chunk], y[i : i + chunk])
        flat = torch.cat([g[n].reshape(g[n].shape[0], -1) for n in names], 1).double()
        s1 = flat.sum(0) if s1 is None else s1 + flat.sum(0)
        s2 += float((flat * flat).sum())
    n = x.shape[0]
    mean_sq = float(s1 @ s1) / n**2
    trace = (s2 - n * mean_sq) / (n - 1)
    grad_sq = mean_sq - trace / n
    return {"grad_sq": grad_sq, "trace_cov": trace, "b_simple": trace / grad_sq, "n": n}


def micro_gradients(model: nn.Module, x: Tensor, y: Tensor, parts: list[Tensor]) -> Tensor:
    """[M, P] rows: the gradient of the mean loss over each index set in ``parts``."""
    params = flat_params(model)
    rows = []
    for idx in parts:
        loss = F.cross_entropy(model(x[idx]), y[idx])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def disjoint(n: int, sizes: list[int], gen: torch.Generator) -> list[Tensor]:
    perm = torch.randperm(n, generator=gen)[: sum(sizes)]
    return list(perm.split(sizes))


def frozen_estimate(model, x, y, sizes: list[int], steps: int, gen) -> dict:
    """NoiseScale over ``steps`` Gram matrices at fixed weights, with the standard error
    the per-step spread gives its ratio (delta method, treating the average as a plain
    mean: at beta 0.995 the weights of 200 steps differ by at most a factor 2.7)."""
    noise = gaf.NoiseScale()
    per_step = []
    for _ in range(steps):
        rows = micro_gradients(model, x, y, disjoint(x.shape[0], sizes, gen))
        est = noise.update(gaf.gram_matrix(rows), sizes)
        per_step.append((est.grad_sq, est.trace_cov))
    g, t = np.array(per_step).T
    resid = t / t.mean() - g / g.mean()
    return {"grad_sq": noise.grad_sq, "trace_cov": noise.trace_cov, "b_simple": noise.b_simple,
            "steps": noise.num_steps, "rel_se": float(resid.std(ddof=1) / math.sqrt(steps)),
            "step_grad_sq_rel_sd": float(g.std(ddof=1) / abs(g.mean()))}


def observed_distances(model, x, y, b: int, pairs: int, gen) -> list[float]:
    out = []
    for _ in range(pairs):
        rows = micro_gradients(model, x, y, disjoint(x.shape[0], [b, b], gen))
        out.append(float(gaf.cosine_distance(rows[0], rows[1])))
    return out


def measure(model, data, args, gen) -> dict:
    x, y = data.train_x, data.train_y
    t0 = time.perf_counter()
    exact = exact_noise_scale(model, x, y)
    t1 = time.perf_counter()
    frozen = {name: frozen_estimate(model, x, y, sizes, args.steps, gen)
              for name, sizes in LAYOUTS.items()}
    t2 = time.perf_counter()
    big_b = exact["b_simple"]
    forecast = []
    for b in SIZES:
        d = observed_distances(model, x, y, b, args.pairs, gen)
        forecast.append({
            "b": b, "median_distance": float(np.median(d)),
            "p10": float(np.percentile(d, 10)), "p90": float(np.percentile(d, 90)),
            "forecast": big_b / (big_b + b), "skip_rate": float(np.mean(np.array(d) > args.tau)),
        })
    return {"exact": exact, "frozen": frozen, "forecast": forecast,
            "b_star": big_b * (1 - args.tau) / args.tau,
            "seconds": {"exact": t1 - t0, "frozen": t2 - t1,
                        "forecast": time.perf_counter() - t2}}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(train_size=args.train_size, test_size=args.test_size, method="average",
                      data_dir=args.data_dir,
                      epochs=max(args.at), seed=args.seed, progress=False, threads=args.threads)
    data = prepare_data(cfg)
    gen = torch.Generator().manual_seed(args.seed)
    points: dict[int, dict] = {}

    def hook(epoch: int, model: nn.Module) -> None:
        if epoch in (0, *args.at):
            print(f"measuring after epoch {epoch} ...", flush=True)
            points[epoch] = measure(model, data, args, gen)
            print(f"  exact B {points[epoch]['exact']['b_simple']:.1f}, frozen "
                  + ", ".join(f"{k}: {v['b_simple']:.1f}" for k, v in points[epoch]['frozen']
                              .items()), flush=True)

    result = train(cfg, data=data, epoch_hook=hook, progress_bar=False)
    for row in result.history:
        if row["epoch"] in points:
            points[row["epoch"]]["training_b_simple"] = row.get("b_simple")
            points[row["epoch"]]["test_acc"] = row["test_acc"]
    return {"command": COMMAND + " " + " ".join(args.argv), "config": cfg.to_dict(),
            "tau": args.tau, "steps": args.steps, "pairs": args.pairs,
            "points": {str(k): v for k, v in sorted(points.items())},
            "history_b_simple": [row.get("b_simple") for row in result.history],
            "versions": versions()}


def _f(v, fmt=".1f") -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def tables(res: dict) -> str:
    lines = [f"Command: `{res['command']}`", "",
             "(b) Noise scale: exact (per-sample gradients over all "
             f"{res['config']['train_size']} training images) against gaf.NoiseScale from "
             f"{res['steps']} steps of micro-batch Gram matrices at the same weights, and the "
             "in-training value `gaf train` wrote for that epoch.", "",
             "| after epoch | test acc | exact tr(Σ) | exact |G|² | exact B | "
             + " | ".join(f"NoiseScale {k} (error, standard error)" for k in LAYOUTS)
             + " | gaf train b_simple |",
             "|---|---|---|---|---|" + "---|" * len(LAYOUTS) + "---|"]
    for epoch, p in res["points"].items():
        ex = p["exact"]
        cells = []
        for k in LAYOUTS:
            est = p["frozen"][k]["b_simple"]
            se = p["frozen"][k].get("rel_se")
            cells.append(f"{_f(est)} ({100 * (est / ex['b_simple'] - 1):+.1f}%"
                         + (f", se {100 * se:.0f}%)" if se is not None else ")"))
        lines.append(f"| {epoch} | {_f(p.get('test_acc'), '.3f')} | {_f(ex['trace_cov'], '.3g')} "
                     f"| {_f(ex['grad_sq'], '.3g')} | {_f(ex['b_simple'])} | "
                     + " | ".join(cells) + f" | {_f(p.get('training_b_simple'))} |")
    lines += ["", f"(c) Forecast: median cosine distance between two micro-gradients of b images "
              f"({res['pairs']} pairs) against D(b) = B/(B+b) with the exact B; skip rate of the "
              f"paper's rule at tau {res['tau']} (M = 2) against the forecast crossing "
              "b* = B(1-tau)/tau.", ""]
    for epoch, p in res["points"].items():
        lines += [f"After epoch {epoch} (exact B {_f(p['exact']['b_simple'])}, "
                  f"b* = {_f(p['b_star'])}):", "",
                  "| b | observed median D (p10-p90) | forecast D(b) | skip rate | forecast |",
                  "|---|---|---|---|---|"]
        for r in p["forecast"]:
            side = "skip (D > tau)" if r["forecast"] > res["tau"] else "accept"
            lines.append(f"| {r['b']} | {r['median_distance']:.3f} ({r['p10']:.3f}-"
                         f"{r['p90']:.3f}) | {r['forecast']:.3f} | {r['skip_rate']:.2f} | "
                         f"{side} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-size", type=int, default=10000)
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--data-dir", help="directory of the Fashion-MNIST files")
    ap.add_argument("--at", type=int, nargs="+", default=[1, 3],
                    help="epochs after which to measure (epoch 0 always)")
    ap.add_argument("--steps", type=int, default=200, help="Gram steps per NoiseScale estimate")
    ap.add_argument("--pairs", type=int, default=30, help="micro-batch pairs per size (c)")
    ap.add_argument("--tau", type=float, default=0.97)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild tables.md from validation.json")
    args = ap.parse_args(argv)
    args.argv = list(argv or [])
    out = Path(args.out)
    if not args.report_only:
        res = run(args)
        out.mkdir(parents=True, exist_ok=True)
        (out / "validation.json").write_text(json.dumps(res, indent=1))
    res = json.loads((out / "validation.json").read_text())
    (out / "tables.md").write_text(tables(res) + "\n")
    print(tables(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
