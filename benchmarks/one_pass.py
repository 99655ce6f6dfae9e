"""Cost of a GAF step from one pass, against the sequential collector and a plain step.

For each model and each (M micro-batches, n samples each), with the methods interleaved
inside every repetition so that machine noise hits them alike:

* plain      — one forward and backward of the whole batch of M·n samples (no filter);
* one-pass   — gaf.OnePassFilter.step: one forward and backward of the same batch, the
               Gram matrix of the M micro-gradients from per-layer pieces, the decision,
               the filtered direction written into .grad;
* sequential — gaf.GradientCollector (mode "auto": streaming for rule "mean"), M forward/
               backward passes of n samples, collect after each, finish.

No optimizer step in any of them (it is the same for all three). tau = 2, so no step is
skipped and every micro-batch is accepted (one-pass then recomputes no rejected micro-batch
for layers over its keep budget; a skipped step costs it less).
Prints median and IQR per method and the paired ratios to plain (median over repetitions
of method / plain taken back to back), in wall-clock time and in the CPU time of the
process's one thread: on a shared machine the second leaves out the time spent waiting
for a core. Then what one-pass holds at the decision against the stacked mode's (M + 1)·P.

    .venv/bin/python benchmarks/one_pass.py [--reps 15] [--threads 1] [--models cnn mlp]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

import gaf
from gaflab.models import build_model

GRID = ((8, 1), (8, 4), (8, 16), (8, 64), (2, 4), (32, 4), (2, 64), (32, 16))


class Block(nn.Module):
    """A pre-norm transformer block over token embeddings, classifying from the mean."""

    def __init__(self, vocab: int = 256, dim: int = 64, heads: int = 4, classes: int = 10):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = self.embed(tokens)
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(b, t, 3, self.heads, -1).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2))
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, d))
        h = h + self.down(F.gelu(self.up(self.norm2(h))))
        return self.head(h.mean(1))


def make_model(name: str) -> tuple[nn.Module, callable]:
    """The model and a function drawing a batch of b samples."""
    if name == "cnn":
        return build_model("small_cnn", 10, 1, 28), lambda b: torch.randn(b, 1, 28, 28)
    if name == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(),
                              nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
        return model, lambda b: torch.randn(b, 1, 28, 28)
    if name == "block":
        return Block(), lambda b: torch.randint(0, 256, (b, 16))
    raise ValueError(f"unknown model {name!r}")


def bench(name: str, m: int, n: int, reps: int, warmup: int) -> tuple[dict, int, int]:
    torch.manual_seed(0)
    model, draw = make_model(name)
    x, y = draw(m * n), torch.randint(0, 10, (m * n,))
    one_pass = gaf.OnePassFilter(model, tau=2.0)
    collector = gaf.GradientCollector(model.parameters(), tau=2.0, num_micro_batches=m)

    def plain():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def one():
        one_pass.step(x, y, F.cross_entropy, m)

    def sequential():
        collector.begin()
        for xs, ys in zip(x.tensor_split(m), y.tensor_split(m), strict=True):
            F.cross_entropy(model(xs), ys).backward()
            collector.collect()
        collector.finish()

    methods = {"plain": plain, "one-pass": one, "sequential": sequential}
    wall = {k: [] for k in methods}
    cpu = {k: [] for k in methods}
    for rep in range(warmup + reps):
        for key, fn in methods.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            if rep >= warmup:
                wall[key].append(time.perf_counter() - t0)
                cpu[key].append(time.thread_time() - c0)
    held = one_pass.step(x, y, F.cross_entropy, m)[0].extra["held"]
    return wall, cpu, held, one_pass.flat.numel


def quartiles(values):
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp", "block"])
    parser.add_argument("--grid", nargs="+", default=[f"{m}x{n}" for m, n in GRID],
                        help="M x n pairs, e.g. 8x4")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} thread(s), python "
          f"{platform.python_version()}; load average at start "
          f"{', '.join(f'{v:.2f}' for v in load) if load else 'n/a'}")
    print(f"{args.reps} reps after {args.warmup} warm-up, tau = 2 (no skipped step)")
    print()
    print("| model | M | n | plain ms (IQR) | one-pass ms (IQR) | sequential ms (IQR) | "
          "one-pass / plain, wall (IQR) | CPU | sequential / plain, wall | CPU | "
          "one-pass held / (M+1)·P |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    worst: dict[str, list] = {}
    for name in args.models:
        for pair in args.grid:
            m, n = (int(v) for v in pair.split("x"))
            wall, cpu, held, p = bench(name, m, n, args.reps, args.warmup)
            cells = []
            for key in ("plain", "one-pass", "sequential"):
                lo, med, hi = quartiles(wall[key])
                cells.append(f"{med * 1e3:.2f} ({(hi - lo) * 1e3:.2f})")
            for key in ("one-pass", "sequential"):
                ratios = {}
                for clock, times in (("wall", wall), ("cpu", cpu)):
                    ratios[clock] = quartiles([a / b for a, b in zip(
                        times[key], times["plain"], strict=True)])
                lo, med, hi = ratios["wall"]
                cells.append(f"{med:.2f} ({lo:.2f}-{hi:.2f})" if key == "one-pass"
                             else f"{med:.2f}")
                cells.append(f"{ratios['cpu'][1]:.2f}")
                if key == "one-pass" and n >= 4:
                    entry = worst.setdefault(name, [0.0, 0.0])
                    entry[0] = max(entry[0], med)
                    entry[1] = max(entry[1], ratios["cpu"][1])
            cells.append(f"{held:,} / {(m + 1) * p:,}")
            print(f"| {name} | {m} | {n} | " + " | ".join(cells) + " |", flush=True)
    print()
    for name, (wall_ratio, cpu_ratio) in worst.items():
        verdict = "met" if max(wall_ratio, cpu_ratio) <= 1.3 else "not met"
        print(f"{name}: worst one-pass / plain at n >= 4: {wall_ratio:.2f} wall, "
              f"{cpu_ratio:.2f} CPU (goal <= 1.3: {verdict})")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load:
        print(f"load average at end {', '.join(f'{v:.2f}' for v in load)}")


if __name__ == "__main__":
    main()
