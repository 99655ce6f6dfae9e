"""Step time of GAF inside DDP and FSDP2 against the engines' own gradient exchange, on gloo.

For N ranks (default 2 and 4, one process each, gloo over loopback, one thread each) and a
wide MLP whose backward is real work (P ≈ 6.3M float32 parameters: 512 -> 2048 -> 2048 ->
512, batch 256 per rank, each rank its own data), one training step (zero_grad, forward,
backward, SGD step) of five methods, interleaved inside every repetition (the order
rotates) after warm-up:

* ddp         DistributedDataParallel with its default all-reduce hook (the baseline);
* ddp+gaf     the same DDP with ``gaf_hook`` (GAFHookState, tau 2: every step taken, so
              every step pays the final gather);
* trainer     ``DistributedGAFTrainer`` (m = 1 micro-gradient per rank, tau 2): GAF's own
              front end, whose exchange runs after backward;
* fsdp        ``fully_shard`` on every Linear and the root, FSDP's reduce-scatter;
* fsdp+gaf    the same with GAF's reduce-scatter (GAFFSDPState, tau 2).

A repetition's time is the slowest rank's; printed are the median and the spread (min-max)
per method, the ratios against the matching baseline (of the medians, and of the fastest
repetitions, which the load of a shared machine disturbs least), and a per-phase profile
on rank 0 (forward, backward, optimizer step; for the GAF methods also the time after the
last bucket/unit, the part that cannot overlap backward, split into waiting for the last
exchanges with their partial Grams, the all-reduce of G with the decision, and the
weighted sums with the final gather; it is included in backward).

    .venv/bin/python benchmarks/ddp_hook.py [--ranks 2 4] [--reps 9] [--warmup 3]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from gaf.distributed import DistributedGAFTrainer, GAFFSDPState, GAFHookState, gaf_hook

METHODS = ("ddp", "ddp+gaf", "trainer", "fsdp", "fsdp+gaf")
PHASES = ("forward", "backward", "step", "decision", "wait+gram", "reduce+decide",
          "sum+gather")


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} logical CPUs, load average {load}"


def make_net(width: int, hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                         nn.ReLU(), nn.Linear(hidden, width))


GRAM_TIME = [0.0]  # time spent waiting for exchanges and forming partial Grams


def timed_gram(cls) -> None:
    gram = cls.gram

    def wrapped(self):
        start = time.perf_counter()
        try:
            return gram(self)
        finally:
            GRAM_TIME[0] += time.perf_counter() - start

    cls.gram = wrapped


def timed_finish(state, phases: dict) -> None:
    """Record how long each decision and the exchange after it take, and their parts:
    waiting for the last exchanges (with their partial Grams), the all-reduce of G with
    the decision, and the weighted sums with the final exchange."""
    finish, decide = state._finish, state.decide
    spent = {}

    def timed_decide(*args):
        start = time.perf_counter()
        result = decide(*args)
        spent["decide"] = time.perf_counter() - start
        return result

    def wrapped(*args):
        GRAM_TIME[0] = 0.0
        start = time.perf_counter()
        finish(*args)
        total = time.perf_counter() - start
        phases.update({"decision": total, "wait+gram": GRAM_TIME[0],
                       "reduce+decide": spent["decide"],
                       "sum+gather": total - GRAM_TIME[0] - spent["decide"]})

    state._finish, state.decide = wrapped, timed_decide


def worker(rank: int, world: int, init: str, width: int, hidden: int, batch: int, reps: int,
           warmup: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    from torch.distributed.fsdp import fully_shard

    from gaf.distributed.fsdp import _Unit
    from gaf.distributed.shard_exchange import ShardExchange

    timed_gram(ShardExchange)
    timed_gram(_Unit)

    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(batch, width, generator=g), torch.randn(batch, width, generator=g)
    base = make_net(width, hidden)

    def sharded(register: bool):
        net = copy.deepcopy(base)
        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(net)
        state = GAFFSDPState(tau=2.0).register(net) if register else None
        return net, state

    models, optimizers, states = {}, {}, {}
    models["ddp"] = nn.parallel.DistributedDataParallel(copy.deepcopy(base))
    models["ddp+gaf"] = nn.parallel.DistributedDataParallel(copy.deepcopy(base))
    states["ddp+gaf"] = GAFHookState(tau=2.0)
    models["ddp+gaf"].register_comm_hook(states["ddp+gaf"], gaf_hook)
    models["fsdp"], _ = sharded(False)
    models["fsdp+gaf"], states["fsdp+gaf"] = sharded(True)
    for name, model in models.items():
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        optimizers[name] = states[name].wrap_optimizer(opt) if name in states else opt
    trainer_net = copy.deepcopy(base)
    trainer = DistributedGAFTrainer(trainer_net, torch.optim.SGD(trainer_net.parameters(),
                                                                  lr=1e-3),
                                    F.mse_loss, 1, tau=2.0, buffer_sync=None)
    phases = {name: {} for name in METHODS}
    for name, state in states.items():
        timed_finish(state, phases[name])

    def step(name: str) -> None:
        if name == "trainer":
            trainer.step(x, y)
            return
        model, opt, ph = models[name], optimizers[name], phases[name]
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = F.mse_loss(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        ph.update(forward=t1 - t0, backward=t2 - t1, step=t3 - t2)

    times = {name: [] for name in METHODS}
    profile = {name: {phase: [] for phase in PHASES} for name in METHODS}
    for rep in range(warmup + reps):
        shift = rep % len(METHODS)
        for name in METHODS[shift:] + METHODS[:shift]:
            dist.barrier()
            start = time.perf_counter()
            step(name)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's time
            if rep >= warmup:
                times[name].append(elapsed.item())
                for phase, value in phases[name].items():
                    profile[name][phase].append(value)
    if rank == 0:
        params = sum(p.numel() for p in base.parameters())
        torch.save({"times": times, "profile": profile, "params": params}, out)
    dist.destroy_process_group()


def fmt_ms(values: list[float]) -> str:
    lo, hi = 1e3 * min(values), 1e3 * max(values)
    return f"{1e3 * statistics.median(values):.0f} ({lo:.0f}-{hi:.0f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()

    print(f"torch {torch.__version__}, gloo, Python {sys.version.split()[0]}, "
          f"{platform.platform()}, host {socket.gethostname()}")
    print(f"machine: {machine()}")
    print(f"MLP {args.width}-{args.hidden}-{args.hidden}-{args.width}, batch {args.batch} per "
          f"rank, {args.reps} repetitions after {args.warmup} warm-up, 1 thread per rank; "
          "times: median (min-max) of the slowest rank, ms\n")
    for world in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "times.pt")
            mp.start_processes(
                worker,
                args=(world, f"file://{tmp}/store", args.width, args.hidden, args.batch,
                      args.reps, args.warmup, out),
                nprocs=world, start_method="spawn",
            )
            found = torch.load(out)
        t, prof = found["times"], found["profile"]
        med = {k: statistics.median(v) for k, v in t.items()}
        print(f"N = {world}, P = {found['params'] / 1e6:.2f}M")
        print("| method | step, ms | median vs baseline | fastest vs fastest |")
        print("|---|---|---|---|")
        baseline = {"ddp": "ddp", "ddp+gaf": "ddp", "trainer": "ddp", "fsdp": "fsdp",
                    "fsdp+gaf": "fsdp"}
        for name in METHODS:
            ratio = med[name] / med[baseline[name]]
            fastest = min(t[name]) / min(t[baseline[name]])
            print(f"| {name} | {fmt_ms(t[name])} | {ratio:.2f}x {baseline[name]} | "
                  f"{fastest:.2f}x |")
        print("\nper-phase medians on rank 0, ms (decision: after the last bucket/unit; "
              "its parts: wait+gram, reduce+decide, sum+gather)")
        print("| method | " + " | ".join(PHASES) + " |")
        print("|---|" + "---|" * len(PHASES))
        for name in METHODS:
            if name == "trainer":
                continue
            cells = [f"{1e3 * statistics.median(prof[name][ph]):.0f}" if prof[name][ph]
                     else "-" for ph in PHASES]
            print(f"| {name} | " + " | ".join(cells) + " |")
        print(flush=True)
    print(f"machine at the end: {machine()}")


if __name__ == "__main__":
    main()
