"""Training throughput of an epoch, GAF against averaging, and what each recipe would take.

A timed repetition is ``--steps`` training steps as the experiment loop takes them: the
step's samples gathered from tensors already on the device, random crop + flip on the
device for the 32×32 models (the CIFAR recipes augment), then

* averaging — plain gradient accumulation: forward/backward of each micro-batch with
              loss / M summed in ``.grad``, one optimizer step (data-parallel SGD's work);
* gaf       — ``gaf.GAFTrainer`` (streaming collector, the paper's rule) at tau = 2, so
              every step is taken: the worst case for GAF, whose skipped steps save the
              optimizer's work.

Both start from the same weights and alternate inside every repetition, so machine noise
hits them alike. Settings: small CNN (1×28×28, 10 classes) and ResNet18/34 (3×32×32, 100
classes), float32 or bf16 autocast (``--amp``), eager or ``torch.compile``d. Printed per
setting: samples/s (median and IQR over repetitions) and the ratio GAF / averaging of the
time per step (median of the per-repetition ratios, with IQR). Evaluation (forward only,
eval mode, no grad) is timed per model for the estimates.

Recipe estimates: for every ``gaflab.recipes`` recipe, the hours of one run and
of the whole grid, from the rates measured here for the recipe's model:
``epochs × (samples per epoch / training rate + (train + test) / evaluation rate)``. The
rate is the GAF rate (the experiment loop steps every method, averaging included, through
GAFTrainer), measured at this run's micro-batch size, not the recipe's: on a CPU the rate
per sample barely depends on it, on a GPU larger batches run faster (pass the recipe's
size with ``--micro-batch-size`` there).

On a CPU ``torch.compile`` of the ResNets takes minutes per setting (inductor compiles C++),
so by default only the small CNN is compiled there (``--compile-models`` to change).

    .venv/bin/python benchmarks/epoch.py [--device auto] [--reps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from torch.nn import functional as F

import gaf
from gaflab.models import build_model
from gaflab.recipes import RECIPES
from gaflab.speed import amp_dtype, prepare_model, step_input
from gaflab.train import augment_batch

# (channels, side, classes) of the synthetic data each model is timed on
SHAPES = {"small_cnn": (1, 28, 10), "resnet18": (3, 32, 100), "resnet34": (3, 32, 100)}
# Official split sizes (train, test) for the recipes' estimates
SPLITS = {"fashion-mnist": (60000, 10000), "mnist": (60000, 10000),
          "cifar10": (50000, 10000), "cifar100": (50000, 10000)}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)  # once per repetition: the timer must see the work done


def make_step(method: str, model, forward, m: int, amp: str | None, dev: torch.device):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    dtype = amp_dtype(amp)
    if method == "gaf":
        trainer = gaf.GAFTrainer(forward, opt, F.cross_entropy, m, tau=2.0,
                                 autocast_dtype=dtype)
        return lambda x, y: trainer.step(x, y)

    def average(x, y):
        opt.zero_grad(set_to_none=True)
        for xs, ys in zip(x.tensor_split(m), y.tensor_split(m), strict=True):
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(forward(xs), ys) / m
            loss.backward()
        opt.step()
    return average


def bench_setting(name: str, amp: str | None, compiled: bool, args, dev) -> dict:
    """Samples/s of averaging and GAF for one (model, precision, compile) setting."""
    c, side, k = SHAPES[name]
    m, b, n_steps = args.num_micro_batches, args.micro_batch_size[name], args.steps[name]
    batch = m * b
    g = torch.Generator().manual_seed(0)
    n = batch * n_steps
    train_x = torch.randn(n, c, side, side, generator=g).to(dev)
    train_y = torch.randint(0, k, (n,), generator=g).to(dev)
    order = torch.randperm(n, generator=g).view(n_steps, batch).to(dev)
    aug = torch.Generator().manual_seed(1)
    augment = side == 32
    steps = {}
    for method in ("averaging", "gaf"):
        torch.manual_seed(0)
        model = build_model(name, k, c, side).to(dev)
        forward = prepare_model(model, args.channels_last, compiled)
        steps[method] = make_step(method, model, forward, m, amp, dev)

    def one_rep(step) -> float:
        _sync(dev)
        t0 = time.perf_counter()
        for s in range(n_steps):
            x = train_x[order[s]]
            if augment:
                x = augment_batch(x, aug)
            step(step_input(x, args.channels_last), train_y[order[s]])
        _sync(dev)
        return time.perf_counter() - t0

    times = {method: [] for method in steps}
    t_start = time.perf_counter()
    for rep in range(args.warmup + args.reps):
        for method, step in steps.items():
            dt = one_rep(step)
            if rep >= args.warmup:
                times[method].append(dt)
    wall = time.perf_counter() - t_start
    samples = batch * n_steps
    out = {"batch": f"{m}x{b}", "wall": wall}
    for method, ts in times.items():
        lo, med, hi = quartiles([samples / t for t in ts])
        out[method] = (med, lo, hi)
    ratios = [a / base for a, base in zip(times["gaf"], times["averaging"], strict=True)]
    out["ratio"] = quartiles(ratios)
    return out


@torch.no_grad()
def eval_rate(name: str, amp: str | None, args, dev) -> float:
    """Samples/s of evaluation (eval mode, no grad) at ``--eval-batch-size``."""
    c, side, k = SHAPES[name]
    torch.manual_seed(0)
    model = build_model(name, k, c, side).to(dev).eval()
    prepare_model(model, args.channels_last)
    x = step_input(torch.randn(args.eval_batch_size, c, side, side).to(dev), args.channels_last)
    dtype = amp_dtype(amp)
    rates = []
    for rep in range(1 + max(2, args.reps // 2)):
        _sync(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            model(x).argmax(1)
        _sync(dev)
        if rep:
            rates.append(x.shape[0] / (time.perf_counter() - t0))
    return statistics.median(rates)


def recipe_estimates(train_rates: dict, eval_rates: dict) -> list[str]:
    lines = ["| recipe | model | runs | epochs | precision | hours per run | hours, all runs |",
             "|---|---|---|---|---|---|---|"]
    for r in RECIPES.values():
        cfg = r.base
        n_train, n_test = SPLITS[cfg.dataset]
        n_train = min(n_train, cfg.train_size or n_train)
        n_test = min(n_test, cfg.test_size or n_test)
        runs = len(r.noise_rates) * len(r.seeds) * sum(
            len(r.taus) if meth == "gaf" else 1 for meth in r.methods)
        per_epoch = n_train // cfg.batch_size * cfg.batch_size
        for amp in ("fp32", "bf16"):
            key = (cfg.model, amp)
            if key not in train_rates or key not in eval_rates:
                continue
            seconds = cfg.epochs * (per_epoch / train_rates[key]
                                    + (n_train + n_test) / eval_rates[key])
            lines.append(f"| {r.name} | {cfg.model} | {runs} | {cfg.epochs} | {amp} | "
                         f"{seconds / 3600:.2f} | {runs * seconds / 3600:.1f} |")
    return lines


def machine(dev: torch.device) -> str:
    if dev.type == "cuda":
        where = torch.cuda.get_device_name(dev)
    else:
        where = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    load = ""
    if hasattr(os, "getloadavg"):  # other work on the machine slows every figure below
        load = f", load average {os.getloadavg()[0]:.1f}"
    return (f"{where}; torch {torch.__version__}, python {platform.python_version()}, "
            f"{torch.get_num_threads()} thread(s), {platform.system()} {platform.release()}"
            f"{load}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, auto")
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--amp", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--compile-models", nargs="*", default=None,
                   help="models also timed compiled (default: all on a GPU, small_cnn on CPU)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--num-micro-batches", type=int, default=2)
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="default: 32 for the small CNN; ResNets 100 on a GPU, 8 on a CPU")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per repetition (default: 20 on a GPU; on a CPU 4, ResNets 2)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                       else "cpu" if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = dev.type == "cuda"
    big = args.micro_batch_size or (100 if gpu else 8)
    args.micro_batch_size = {"small_cnn": args.micro_batch_size or 32, "resnet18": big,
                             "resnet34": big}
    steps = args.steps or (20 if gpu else 4)
    args.steps = {"small_cnn": steps, "resnet18": args.steps or (20 if gpu else 2),
                  "resnet34": args.steps or (20 if gpu else 2)}
    args.eval_batch_size = args.eval_batch_size or (1000 if gpu else 128)
    compile_models = (args.compile_models if args.compile_models is not None
                      else list(SHAPES) if gpu else ["small_cnn"])
    print(machine(dev))
    per_rep = ", ".join(f"{k} {v}" for k, v in args.steps.items() if k in args.models)
    print(f"steps per repetition: {per_rep}; {args.reps} repetitions after {args.warmup} "
          f"warm-up, M = {args.num_micro_batches}, channels-last {args.channels_last}; "
          f"GAF at tau 2 (every step taken)")
    print()
    print("| model | batch | precision | compiled | averaging samples/s (IQR) | "
          "GAF samples/s (IQR) | GAF / averaging time (IQR) |")
    print("|---|---|---|---|---|---|---|")
    train_rates, eval_rates = {}, {}
    t0 = time.perf_counter()
    for name in args.models:
        for amp in args.amp:
            for compiled in (False, True) if name in compile_models else (False,):
                r = bench_setting(name, None if amp == "fp32" else amp, compiled, args, dev)
                a, g, q = r["averaging"], r["gaf"], r["ratio"]
                print(f"| {name} | {r['batch']} | {amp} | {'yes' if compiled else 'no'} | "
                      f"{a[0]:.0f} ({a[1]:.0f}-{a[2]:.0f}) | {g[0]:.0f} ({g[1]:.0f}-{g[2]:.0f})"
                      f" | {q[1]:.3f} ({q[0]:.3f}-{q[2]:.3f}) |", flush=True)
                if not compiled:
                    train_rates[(name, amp)] = g[0]
            eval_rates[(name, amp)] = eval_rate(name, None if amp == "fp32" else amp, args, dev)
    print()
    print(f"Evaluation samples/s (batch {args.eval_batch_size}): " + ", ".join(
        f"{n} {a} {v:.0f}" for (n, a), v in eval_rates.items()))
    print()
    print("Estimated time of each recipe at these rates (eager; GAF's rate for every run):")
    for line in recipe_estimates(train_rates, eval_rates):
        print(line)
    print(f"\nbenchmark wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
