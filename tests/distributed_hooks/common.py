"""What the hook workers share: a small model, rank-local data, the one-process reference
(every rank's local gradient, all-gathered, filtered by gaf.filter_gradients) and the
launcher that runs a worker under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn

import gaf


def make_net(seed: int = 0, width: int = 24, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 3)).to(dtype)


def rank_batch(rank: int, step: int, n: int = 8, dtype=torch.float32):
    """This rank's own data for a step (different on every rank)."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(n, 6, generator=g).to(dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def flat_grads(params, like=None) -> torch.Tensor:
    """Parameters' gradients as one flat vector; a missing gradient counts as zeros."""
    out = []
    for p in params:
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out.append(torch.zeros(p.shape, dtype=p.dtype).reshape(-1) if g is None
                   else g.detach().reshape(-1))
    return torch.cat(out)


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """[N, P]: every rank's flat vector, in rank order."""
    n = dist.get_world_size()
    rows = torch.empty(n * local.numel(), dtype=local.dtype)
    dist.all_gather_into_tensor(rows, local.contiguous())
    return rows.view(n, -1)


def same_on_all_ranks(t: torch.Tensor) -> bool:
    rows = gather_rows(t)
    return all(torch.equal(rows[0], rows[i]) for i in range(rows.shape[0]))


def reference(local: torch.Tensor, spec: gaf.FilterSpec) -> gaf.FilterResult:
    """gaf.filter_gradients over the N ranks' local gradients, in one process."""
    return gaf.filter_gradients(gather_rows(local), spec.tau, spec.rule,
                                rule_options=spec.rule_options)


def finish(out: Path, name: str, report: dict) -> NoReturn:
    """Write the report (rank 0), leave together, close the group and end the process."""
    if dist.get_rank() == 0:
        (out / f"{name}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()
    exit_now()


def exit_now() -> NoReturn:
    """End a worker without the interpreter's shutdown.

    A process that built a DistributedDataParallel model keeps its gloo process group (two
    ``pt_gloo_runloop`` threads, one ``gloo_tcp_loop``) alive after
    ``destroy_process_group()``: torch 2.13 holds it from C++, even after ``del model;
    gc.collect()``. A gloo thread may still be dropping the last finished work (the barrier
    above, which holds the collective before it) when the main thread is already in
    ``Py_FinalizeEx``; freeing that work's tensors takes the GIL, Python ends the thread
    with ``pthread_exit`` inside a C++ destructor, and the rank aborts with "terminate
    called without an active exception" (seen in a core dump of a test worker). Leaving
    with ``os._exit`` once the work is done skips finalisation, and with it that window.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(worker: str, world: int, out: Path, *args: str, timeout: int = 240) -> dict:
    """Run ``worker`` (a file beside this one) in ``world`` gloo processes; its report."""
    path = Path(__file__).with_name(worker)
    # PYTHONFAULTHANDLER: should a rank abort in C++, its Python stacks land in the report.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(world), str(path), str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads((out / f"{Path(worker).stem}.json").read_text())
