"""Distributed front ends with the consensus rule and with a blind control, against one
process over all N·m micro-batches (real gloo processes, as in test_distributed)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gaf
from gaf.distributed import DistributedGAFTrainer
from test_distributed import Net, batch, same_decision, spawn, state_equal_across_ranks


def _rule_and_control_checks(rank: int, n: int) -> None:
    loss_fn = nn.functional.cross_entropy
    m, b = 2, 8  # micro-batches per rank, samples per micro-batch
    # The consensus rule with one micro-batch per rank, and a blind control seeded alike on
    # every rank: the same decisions and bits as one process over all N·m rows.
    for mm, kwargs in ((1, {"rule": "consensus", "tau": 0.97}),
                       (m, {"control": gaf.RandomDrop(0.5, seed=4)})):
        torch.manual_seed(0)
        base = Net()
        dist_model, one_model = copy.deepcopy(base), copy.deepcopy(base)
        single_kwargs = dict(kwargs)
        if "control" in kwargs:
            single_kwargs["control"] = gaf.RandomDrop(0.5, seed=4)
        trainer = DistributedGAFTrainer(dist_model, torch.optim.SGD(dist_model.parameters(),
                                        lr=0.1), loss_fn, mm, **kwargs)
        one = gaf.GAFTrainer(one_model, torch.optim.SGD(one_model.parameters(), lr=0.1),
                             loss_fn, n * mm, mode="stacked", **single_kwargs)
        for step in range(6):
            xs, ys = zip(*(batch(70 + step, i, mm * b) for i in range(n)), strict=True)
            out = trainer.step(xs[rank], ys[rank])
            ref_out = one.step(torch.cat(xs), torch.cat(ys))
            same_decision(out.result, ref_out.result)
            assert state_equal_across_ranks(dist_model)
            for p, q in zip(dist_model.parameters(), one_model.parameters(), strict=True):
                assert torch.equal(p, q), (kwargs, step)



@pytest.mark.parametrize("world_size", [2, 4])
def test_consensus_and_controls_match_one_process(tmp_path, world_size):
    spawn(_rule_and_control_checks, world_size, tmp_path)
