"""A tiny classification problem and the GAFTrainer run every integration is compared with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gaf

FEATURES, CLASSES = 6, 3


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES))


def make_data(samples: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(samples, FEATURES, generator=g), torch.randint(0, CLASSES, (samples,),
                                                                      generator=g)


def reference_run(net, optimizer, x, y, *, micro_batch: int, num_micro_batches: int, tau: float,
                  scheduler=None, **trainer_kwargs) -> gaf.GAFTrainer:
    """GAFTrainer over the same micro-batches, in order, ``num_micro_batches`` per step; the
    scheduler steps after taken steps only."""
    trainer = gaf.GAFTrainer(net, optimizer, F.cross_entropy, num_micro_batches, tau=tau,
                             **trainer_kwargs)
    step = micro_batch * num_micro_batches
    for start in range(0, len(x), step):
        out = trainer.step(x[start:start + step], y[start:start + step])
        if scheduler is not None and not out.skipped:
            scheduler.step()
    return trainer


def assert_same_tensors(a, b, what: str) -> None:
    a, b = list(a), list(b)
    assert len(a) == len(b), what
    for i, (s, t) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(s, t), f"{what}[{i}] differs: max |diff| {(s - t).abs().max()}"


def optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    """Every tensor of the optimizer's per-parameter state (momentum, Adam moments, step)."""
    out = []
    for p in (p for g in optimizer.param_groups for p in g["params"]):
        for key in sorted(optimizer.state.get(p, {})):
            value = optimizer.state[p][key]
            out.append(value if isinstance(value, torch.Tensor) else torch.tensor(value))
    return out


FRAMEWORKS = ("accelerate", "transformers", "lightning")
_two_rank_runs: dict = {}  # one launch serves the three frameworks' tests


def two_rank_reports(tmp_path: Path) -> list[dict]:
    """Both ranks' reports of ddp_worker.py, which runs every framework in turn in one pair of
    gloo processes under torchrun (imports and start-up are most of a launch's time). The
    first call launches it, in ``tmp_path``; later calls reuse its outcome, failure included."""
    if "outcome" not in _two_rank_runs:
        worker = Path(__file__).with_name("ddp_worker.py")
        # PYTHONFAULTHANDLER: should a rank abort in C++, its Python stacks land in the report.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(worker), *FRAMEWORKS, str(tmp_path)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        _two_rank_runs["outcome"] = (
            (done.stdout[-3000:] + done.stderr[-5000:]) if done.returncode
            else [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)])
    outcome = _two_rank_runs["outcome"]
    assert not isinstance(outcome, str), outcome
    return outcome


def check_two_rank_run(framework: str, tmp_path: Path, micro_batches_per_rank: int) -> None:
    """``framework``'s part of the 2-process gloo run (:func:`two_rank_reports`): every rank
    must end bit-identical to DistributedGAFTrainer, with the same counters, skipped and
    taken steps both present, and the decisions covering both ranks' micro-gradients."""
    reports = [report[framework] for report in two_rank_reports(tmp_path)]
    for report in reports:
        assert all(report["same_as_reference"]), report
        assert report["stats"] == report["reference_stats"]
        assert report["ranks_agree"]
    stats = reports[0]["stats"]
    assert 0 < stats["skipped_steps"] < stats["steps"]
    assert stats["micro_batches"] == 2 * micro_batches_per_rank * stats["steps"]
