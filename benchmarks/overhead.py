"""Cost of a GAF step against plain micro-batch gradient accumulation, on one device.

For M = 2, 4, 8 micro-batches of a small CNN on 28×28 inputs, times in one run, with the
methods interleaved inside every repetition so that machine noise hits them alike:

* plain     — forward/backward of each micro-batch with loss/M accumulating in .grad,
              one optimizer step (the baseline);
* streaming — gaf.GAFTrainer, rule "mean", streaming collector (one running sum);
* stacked   — gaf.GAFTrainer, rule "mean", stacked collector ([M, P] rows + Gram);
* authors   — step_GAF from the authors' package gradient-agreement-filtering==0.1.3
              (install with `pip install --no-deps gradient-agreement-filtering==0.1.3`),
              fed Subsets of a TensorDataset as its API requires.

tau = 2 everywhere, so every method takes every optimizer step (the worst case for GAF:
a skipped step would save the optimizer's work). Prints median and spread (IQR) per
method and the ratio to plain, then the extra memory each collector mode holds.

    .venv/bin/python benchmarks/overhead.py [--reps 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

import gaf


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 5 * 5, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def make_plain(model, opt, m):
    def step(x, y):
        opt.zero_grad(set_to_none=True)
        for xs, ys in zip(torch.tensor_split(x, m), torch.tensor_split(y, m)):
            (F.cross_entropy(model(xs), ys) / m).backward()
        opt.step()
    return step


def make_gaf(model, opt, m, mode):
    trainer = gaf.GAFTrainer(model, opt, F.cross_entropy, m, tau=2.0, mode=mode)
    return lambda x, y: trainer.step(x, y), trainer


def make_authors(model, opt, m):
    try:
        from gradient_agreement_filtering import step_GAF
    except ImportError:
        return None
    from torch.utils.data import Subset, TensorDataset

    def step(x, y):
        data = TensorDataset(x, y)
        idx = torch.arange(len(x)).tensor_split(m)
        micro = [Subset(data, i.tolist()) for i in idx]
        step_GAF(model, opt, F.cross_entropy, micro, wandb=False, verbose=False,
                 cos_distance_thresh=2.0)
    return step


def quartiles(values):
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def bench(m: int, micro: int, reps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(m * micro, 1, 28, 28)
    y = torch.randint(0, 10, (m * micro,))
    methods = {}
    for name in ("plain", "streaming", "stacked", "authors"):
        model = small_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        if name == "plain":
            methods[name] = make_plain(model, opt, m)
        elif name == "authors":
            fn = make_authors(model, opt, m)
            if fn is not None:
                methods[name] = fn
        else:
            methods[name], _ = make_gaf(model, opt, m, name)
    times = {name: [] for name in methods}
    for rep in range(warmup + reps):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn(x, y)
            dt = time.perf_counter() - t0
            if rep >= warmup:
                times[name].append(dt)
    return times


def own_work(m: int, micro: int, reps: int, warmup: int) -> dict:
    """Median time of the collector's own calls in a step (begin, M collects, finish), by
    mode: the part of a GAF step that plain accumulation does not do. Short, so far less
    exposed to machine noise than whole-step times."""
    x = torch.randn(micro, 1, 28, 28)
    y = torch.randint(0, 10, (micro,))
    out = {}
    for mode in ("streaming", "stacked"):
        model = small_cnn()
        collector = gaf.GradientCollector(model.parameters(), tau=2.0, mode=mode,
                                          num_micro_batches=m)
        times = []
        for rep in range(warmup + reps):
            spent = 0.0
            t0 = time.perf_counter()
            collector.begin()
            spent += time.perf_counter() - t0
            for _ in range(m):
                F.cross_entropy(model(x), y).backward()
                t0 = time.perf_counter()
                collector.collect()
                spent += time.perf_counter() - t0
            t0 = time.perf_counter()
            collector.finish()
            spent += time.perf_counter() - t0
            if rep >= warmup:
                times.append(spent)
        out[mode] = statistics.median(times)
    return out


def held_bytes(m: int, micro: int) -> dict:
    """Bytes of the buffers each collector mode holds beyond the model's own .grad."""
    out = {}
    x = torch.randn(m * micro, 1, 28, 28)
    y = torch.randint(0, 10, (m * micro,))
    for mode in ("streaming", "stacked"):
        model = small_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        _, trainer = make_gaf(model, opt, m, mode)
        trainer.step(x, y)
        c = trainer.collector
        buffers = c.backend.buffers()
        # The buffer .grad is bound to would exist anyway as .grad: count it once less.
        bound = sum(p.numel() * p.element_size() for p in c.params)
        out[mode] = sum(b.numel() * b.element_size() for b in buffers) - bound
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ms", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import gradient_agreement_filtering  # noqa: F401
        authors = "gradient-agreement-filtering 0.1.3"
    except ImportError:
        authors = "not installed (pip install --no-deps gradient-agreement-filtering==0.1.3)"
    p = sum(q.numel() for q in small_cnn().parameters())
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} thread(s), python {platform.python_version()}")
    print(f"small CNN, P = {p:,} parameters, micro-batch {args.micro_batch}, "
          f"{args.reps} reps after {args.warmup} warm-up; authors' package: {authors}")
    print()
    # "paired" is the median over repetitions of (method / plain) within the same
    # repetition: adjacent in time, so slow drifts in machine load cancel out.
    print("| M | method | median ms | IQR ms | median / plain | paired ratio (IQR) |")
    print("|---|---|---|---|---|---|")
    plain_ms = {}
    for m in args.ms:
        times = bench(m, args.micro_batch, args.reps, args.warmup)
        plain_ms[m] = statistics.median(times["plain"])
        base = statistics.median(times["plain"])
        for name, values in times.items():
            lo, med, hi = quartiles(values)
            ratios = [v / b for v, b in zip(values, times["plain"])]
            rlo, rmed, rhi = quartiles(ratios)
            print(f"| {m} | {name} | {med * 1e3:.2f} | {(hi - lo) * 1e3:.2f} | "
                  f"{med / base:.3f} | {rmed:.3f} ({rlo:.3f}-{rhi:.3f}) |")
    print()
    print("GAF's own work per step (begin + M x collect + finish), median, and 1 + that / plain:")
    print("| M | streaming ms | stacked ms | streaming ratio | stacked ratio |")
    print("|---|---|---|---|---|")
    for m in args.ms:
        own = own_work(m, args.micro_batch, args.reps, args.warmup)
        base = plain_ms[m]
        print(f"| {m} | {own['streaming'] * 1e3:.3f} | {own['stacked'] * 1e3:.3f} | "
              f"{1 + own['streaming'] / base:.4f} | {1 + own['stacked'] / base:.4f} |")
    print()
    print("| M | streaming extra bytes | stacked extra bytes |")
    print("|---|---|---|")
    for m in args.ms:
        held = held_bytes(m, args.micro_batch)
        print(f"| {m} | {held['streaming']:,} | {held['stacked']:,} |")


if __name__ == "__main__":
    main()
