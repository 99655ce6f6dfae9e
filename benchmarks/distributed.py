"""Communication cost of distributed GAF against a plain all-reduce, on gloo.

For N ranks (default 2 and 4, one process each, gloo over loopback) and P floats per
micro-gradient (default 1M to 25M), times in one run, interleaved inside every repetition
(the order rotates) so that machine noise hits the methods alike:

* allreduce — ``dist.all_reduce`` of one [P] gradient and the division by N: what plain
              data-parallel SGD (DDP) pays per step; the baseline;
* sharded   — ``filter_gradients_distributed(method="sharded")``: the whole GAF step
              (cross-rank check, all_to_all of shards, Gram, all_reduce of the tiny Gram
              matrices, decision, weighted sum of the shard, all_gather);
* allgather — the same with ``method="allgather"``: every rank receives every other
              rank's full micro-gradient (the authors' research script's protocol).

Each rank holds m = 1 micro-gradient (``--m`` to change). A repetition's time is the
slowest rank's; printed are the median over repetitions and the spread (min-max), the
ratios, and the bytes each rank sends per step by each method (algorithmic, float32):

    allreduce (ring)  2·P·(N-1)/N
    sharded           (m+1)·P·(N-1)/N      = 2·P·(N-1)/N for m = 1
    allgather         (N-1)·m·P            (and N·m·P held by every rank)

    .venv/bin/python benchmarks/distributed.py [--ranks 2 4] [--sizes 1 4 10 25] [--reps 7]
"""

from __future__ import annotations

import argparse
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
from traffic import traffic  # benchmarks/traffic.py, beside this script

from gaf.distributed import Workspace, filter_gradients_distributed

METHODS = ("allreduce", "sharded", "allgather")


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"{cpu}, {os.cpu_count()} logical CPUs, load average {load}"


def worker(rank: int, world: int, init: str, sizes: list[int], m: int, reps: int, warmup: int,
           threads: int, out: str) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    results = {}
    for p in sizes:
        gen = torch.Generator().manual_seed(rank)
        local = torch.randn(m, p, generator=gen)
        grad = local.sum(0)

        def allreduce(grad=grad):
            dist.all_reduce(grad)
            grad.div_(world)

        # Like DDP's buckets and the collector's buffers, every method reuses its buffers.
        spaces = {name: (Workspace(), torch.zeros(p)) for name in METHODS[1:]}

        def gaf_step(method, local=local, spaces=spaces):
            workspace, out = spaces[method]
            filter_gradients_distributed(local, 0.97, method=method, out=out,
                                         workspace=workspace)

        ops = {
            "allreduce": allreduce,
            "sharded": lambda: gaf_step("sharded"),
            "allgather": lambda: gaf_step("allgather"),
        }
        times = {name: [] for name in METHODS}
        for rep in range(warmup + reps):
            shift = rep % len(METHODS)
            for name in METHODS[shift:] + METHODS[:shift]:
                dist.barrier()
                start = time.perf_counter()
                ops[name]()
                elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's time
                if rep >= warmup:
                    times[name].append(elapsed.item())
        results[p] = times
        del local, grad, ops, spaces
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def fmt_ms(values: list[float]) -> str:
    lo, hi = 1e3 * min(values), 1e3 * max(values)
    return f"{1e3 * statistics.median(values):.1f} ({lo:.0f}-{hi:.0f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 10, 25],
                    help="P in millions of float32 elements")
    ap.add_argument("--m", type=int, default=1, help="micro-gradients per rank")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = ap.parse_args()
    sizes = [int(s * 1_000_000) for s in args.sizes]

    print(f"torch {torch.__version__}, gloo, Python {sys.version.split()[0]}, "
          f"{platform.platform()}, host {socket.gethostname()}")
    print(f"machine: {machine()}")
    print(f"m = {args.m} micro-gradient(s) per rank, {args.reps} repetitions after "
          f"{args.warmup} warm-up, {args.threads} thread(s) per rank; "
          "times: median (min-max) of the slowest rank, ms\n")
    header = (f"{'N':>2} {'P':>5} | {'all_reduce':>18} {'GAF sharded':>18} {'GAF all-gather':>18} "
              f"| {'sharded/AR':>10} {'allgather/sh':>12} | MB sent per rank: AR / sh / ag")
    print(header)
    print("-" * len(header))
    rows = []
    for world in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "times.pt")
            mp.start_processes(
                worker,
                args=(world, f"file://{tmp}/store", sizes, args.m, args.reps, args.warmup,
                      args.threads, out),
                nprocs=world,
                start_method="spawn",
            )
            results = torch.load(out)
        for p in sizes:
            t = results[p]
            med = {k: statistics.median(v) for k, v in t.items()}
            mb = [traffic(k, p, args.m if k != "allreduce" else 1, world).bytes_sent(4) / 1e6
                  for k in METHODS]
            line = (f"{world:>2} {p / 1e6:>4g}M | {fmt_ms(t['allreduce']):>18} "
                    f"{fmt_ms(t['sharded']):>18} {fmt_ms(t['allgather']):>18} | "
                    f"{med['sharded'] / med['allreduce']:>10.2f} "
                    f"{med['allgather'] / med['sharded']:>12.2f} | "
                    f"{mb[0]:.0f} / {mb[1]:.0f} / {mb[2]:.0f}")
            print(line, flush=True)
            rows.append(line)
    print(f"\nmachine at the end: {machine()}")


if __name__ == "__main__":
    main()
