"""Distributed GAF on real processes (gloo, CPU): each rank's view against one process.

Process groups are expensive to start on the small shared machines here, so each test
spawns one group and runs many checks inside it; a failing assertion in any rank fails the
spawn with that rank's traceback (and torch.multiprocessing stops the other ranks).
"""

from __future__ import annotations

import copy
import datetime
import os
import time
import warnings

import pytest
import torch
import torch._dynamo  # noqa: F401  DDP imports it lazily (seconds): forked ranks inherit it
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gaf
from gaf.core import RULES
from gaf.distributed import (
    DistributedGAFTrainer,
    DistributedGradientCollector,
    GAFDistributedError,
    filter_gradients_distributed,
)
from gaf.distributed import protocol as protocol_module
from gaf.distributed.comm import Comm, Workspace

PG_TIMEOUT_S = 60
# fork: the ranks inherit the imported torch instead of importing it again (seconds each on
# the shared machines); they use one intra-op thread and no CUDA.
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def _entry(rank: int, fn, world_size: int, init: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    try:
        fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world_size: int, tmp_path, *args) -> None:
    init = f"file://{tmp_path}/store-{fn.__name__}-{world_size}"
    mp.start_processes(
        _entry, args=(fn, world_size, init, args), nprocs=world_size, start_method=START_METHOD
    )


# -- helpers used inside the ranks -------------------------------------------------------


def micro_gradients(seed: int, rows: int, p: int, dtype=torch.float64) -> torch.Tensor:
    """Rows that partly agree: a shared direction plus noise of varying strength, so that
    every rule accepts some rows and rejects others at tau around 0.6-1.0."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(p, generator=gen, dtype=torch.float64)
    strength = torch.rand(rows, 1, generator=gen, dtype=torch.float64) * 3
    noise = torch.randn(rows, p, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(rows, 1, generator=gen) < 0.2, -1.0, 1.0).double()
    return (sign * base + strength * noise).to(dtype)


def all_equal_across_ranks(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    return all(torch.equal(g, gathered[0]) for g in gathered)


def same_decision(dist_result, single) -> None:
    assert torch.equal(dist_result.accepted, single.accepted), (
        dist_result.accepted, single.accepted)
    assert torch.equal(dist_result.weights, single.weights)
    assert dist_result.anchor == single.anchor
    assert dist_result.num_invalid == single.num_invalid
    assert dist_result.skipped == single.skipped
    torch.testing.assert_close(dist_result.distances, single.distances, rtol=0, atol=1e-5)


def expect_error(fn, *fragments) -> str:
    try:
        fn()
    except GAFDistributedError as exc:
        text = str(exc)
        for fragment in fragments:
            assert fragment in text, text
        return text
    raise AssertionError("expected GAFDistributedError")


# -- the protocol: decisions, updates, edge cases ------------------------------------------


def _protocol_checks(rank: int, n: int) -> None:
    # Every rule, both methods, m = 1 and 2, P divisible by N or not, float64 and float32:
    # decision and update equal to the one-process filter over the same N·m rows.
    cases = partial = 0
    both = ("sharded", "allgather")
    for dtype, methods in ((torch.float64, both), (torch.float32, ("sharded",))):
        for m, p in ((1, 64), (2, 1003), (3, 5)):
            for seed in range(1):
                x = micro_gradients(100 * m + seed, n * m, p, dtype)
                local = x[rank * m : (rank + 1) * m]
                for rule in RULES:
                    for tau in (0.6, 0.97):
                        single = gaf.filter_gradients(x, tau, rule)
                        for method in methods:
                            res = filter_gradients_distributed(local, tau, rule, method=method)
                            same_decision(res, single)
                            assert res.extra["method"] == method
                            assert res.extra["local_rows"] == slice(rank * m, (rank + 1) * m)
                            assert res.grad.dtype == dtype and res.grad.shape == (p,)
                            # Same weights, same elementwise arithmetic: same bits.
                            assert torch.equal(res.grad, single.grad), (rule, method, m, p)
                            assert all_equal_across_ranks(res.grad)
                            cases += 1
                            partial += 2 <= res.num_accepted < n * m
    assert cases == 3 * 3 * len(RULES) * 2
    # Most cases accept some rows and reject others (the test would be weak otherwise).
    assert partial >= cases // 3, (partial, cases)

    # Many chunks (short last chunk, empty blocks), both gather paths, a reused workspace
    # and output buffer: still the one-process result, bit for bit.
    workspace = Workspace()
    comm = Comm()
    for gather in ("broadcast", "all_gather"):
        for m, p, chunk in ((1, 1003, 64), (2, 1003, 7), (3, 50, 1), (1, 3, 2), (2, 64, 16)):
            x = micro_gradients(31 + p, n * m, p, torch.float32)
            single = gaf.filter_gradients(x, 0.97)
            for method in ("sharded", "allgather"):
                out = torch.full((p,), float("nan"))
                res = protocol_module.run_protocol(
                    x[rank * m : (rank + 1) * m], 0.97, "mean", comm, method=method,
                    out=out, workspace=workspace, chunk_elements=chunk, gather=gather)
                same_decision(res, single)
                assert res.grad is out and torch.equal(out, single.grad), (gather, m, p)
    plan = protocol_module.ShardPlan.make(1003, n, 64)
    covered = sorted(i for c in range(plan.chunks)
                     for j, length in enumerate(plan.chunk(c)[1])
                     for i in range(plan.chunk(c)[0] + j * plan.block,
                                    plan.chunk(c)[0] + j * plan.block + length))
    assert covered == list(range(1003))

    # Half precision travels as is; the Gram is accumulated in float64, as on one device.
    # PyTorch's half-precision add may round differently in a vector body and its scalar
    # tail, so a block starting at another offset can differ from one device in the last
    # bit; across ranks it is still the same bits (each element is computed once).
    for dtype in (torch.float16, torch.bfloat16):
        x = micro_gradients(37, n * 2, 301, dtype)
        res = filter_gradients_distributed(x[rank * 2 : rank * 2 + 2], 0.97)
        single = gaf.filter_gradients(x, 0.97)
        same_decision(res, single)
        assert res.grad.dtype == dtype
        torch.testing.assert_close(res.grad, single.grad)
        assert all_equal_across_ranks(res.grad)

    # tau = 2 is the plain mean: the same as an all_reduce of the local sums.
    for m, p in ((1, 1001), (2, 64)):
        x = micro_gradients(11, n * m, p, torch.float32)
        local = x[rank * m : (rank + 1) * m]
        res = filter_gradients_distributed(local, 2.0)
        total = local.sum(0)
        dist.all_reduce(total)
        torch.testing.assert_close(res.grad, total / (n * m))
        assert res.num_accepted == n * m and not res.skipped

    # P smaller than N (some shards are all padding), and P = 1.
    for p in (1, n - 1 or 1):
        x = micro_gradients(13, n, p)
        res = filter_gradients_distributed(x[rank : rank + 1], 2.0)
        assert torch.equal(res.grad, gaf.filter_gradients(x, 2.0).grad)

    # Nothing agrees (tau = 0 over noisy rows): the step is skipped on every rank alike.
    x = micro_gradients(17, n * 2, 128)
    for method in ("sharded", "allgather"):
        res = filter_gradients_distributed(x[rank * 2 : rank * 2 + 2], 0.0, method=method)
        assert res.skipped and res.num_accepted == 1
        flag = torch.tensor([float(res.skipped)])
        dist.all_reduce(flag)
        assert flag.item() == n

    # Non-finite micro-gradients on one rank: rejected like on one device, and they do not
    # poison anybody else's Gram entries or the update. NaN sits in one shard only.
    m, p = 2, 257
    x = micro_gradients(19, n * m, p, torch.float32)
    x[1, 3] = float("nan")  # rank 0, second row, first shard
    x[n * m - 1, p - 1] = float("inf")  # last rank, last row, last shard
    for rule in RULES:
        single = gaf.filter_gradients(x, 2.0, rule)
        res = filter_gradients_distributed(x[rank * m : (rank + 1) * m], 2.0, rule)
        same_decision(res, single)
        assert res.num_invalid == 2 and res.num_accepted == n * m - 2
        assert torch.isfinite(res.grad).all()
        assert torch.equal(res.grad, single.grad)

    # Finite float32 rows of extreme size (|g|² over- or underflows float32) on some ranks
    # only: they decide as the unscaled rows, and every rank reduces the same dtype.
    m, p = 2, 257
    x = micro_gradients(47, n * m, p, torch.float32)
    ref = gaf.filter_gradients(x, 0.97)
    assert 2 <= ref.num_accepted < n * m
    for scale in (1e20, 1e-30):
        y = x.clone()
        y[: m] *= scale  # rank 0's rows only
        for method in ("sharded", "allgather"):
            res = filter_gradients_distributed(y[rank * m : (rank + 1) * m], 0.97,
                                               method=method)
            assert res.num_invalid == 0, (scale, method)
            assert torch.equal(res.accepted, gaf.filter_gradients(y, 0.97).accepted)
        z = x * scale  # every rank's rows
        res = filter_gradients_distributed(z[rank * m : (rank + 1) * m], 0.97)
        assert res.num_invalid == 0 and torch.equal(res.accepted, ref.accepted), scale

    # A passed group: the ranks of a sub-group filter among themselves.
    if n >= 4:
        sub_ranks = [1, 3]
        sub = dist.new_group(sub_ranks)  # every rank must take part in creating it
        x = micro_gradients(23, 2 * 2, 99)
        if rank in sub_ranks:
            i = sub_ranks.index(rank)
            for method in ("sharded", "allgather"):
                res = filter_gradients_distributed(x[2 * i : 2 * i + 2], 0.97, group=sub,
                                                   method=method)
                single = gaf.filter_gradients(x, 0.97)
                same_decision(res, single)
                assert torch.equal(res.grad, single.grad)
                assert res.extra["world_size"] == 2 and res.extra["rank"] == i
        dist.barrier()

    # A backend without all_to_all: sharded falls back to the all-gather protocol.
    real = dist.all_to_all_single

    def refuse(*args, **kwargs):
        raise NotImplementedError("all_to_all is not supported by this backend")

    dist.all_to_all_single = refuse
    try:
        x = micro_gradients(29, n, 50)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = filter_gradients_distributed(x[rank : rank + 1], 0.97)
        assert res.extra["method"] == "allgather"
        assert any("falls back" in str(w.message) for w in caught)
        assert torch.equal(res.grad, gaf.filter_gradients(x, 0.97).grad)
    finally:
        dist.all_to_all_single = real
        protocol_module._NO_ALL_TO_ALL.clear()

    # Mismatches across ranks fail with the same clear error on every rank, before any
    # gradient data moves; the group stays usable afterwards.
    x = torch.randn(2, 100 + (rank == n - 1), dtype=torch.float64)
    expect_error(lambda: filter_gradients_distributed(x, 0.97), "P (elements", "differs",
                 f"rank {n - 1}: 101")
    x = torch.randn(1 + (rank == 0), 100, dtype=torch.float64)
    expect_error(lambda: filter_gradients_distributed(x, 0.97), "m (micro-gradients")
    x = torch.randn(2, 100, dtype=torch.float64)
    expect_error(lambda: filter_gradients_distributed(x, 0.9 + 0.01 * (rank == 0)), "tau")
    expect_error(lambda: filter_gradients_distributed(x, 0.9, RULES[rank % 2]), "rule")
    expect_error(lambda: filter_gradients_distributed(x.to(torch.float32 if rank else
                                                            torch.float64), 0.9), "dtype")
    res = filter_gradients_distributed(x, 2.0)
    assert res.num_accepted == 2 * n


@pytest.mark.parametrize("world_size", [2, 4])
def test_protocol_matches_one_process(tmp_path, world_size):
    spawn(_protocol_checks, world_size, tmp_path)


# -- the front ends: .grad, optimizer steps, buffers, DDP --------------------------------


class Net(nn.Module):
    """BatchNorm (buffers), a frozen parameter, and a layer that never gets a gradient."""

    def __init__(self, hidden: int = 13):
        super().__init__()
        self.fc1 = nn.Linear(7, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 3)
        self.unused = nn.Linear(3, 2)  # trainable, but its .grad stays None
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x)))) * self.frozen


class TauSchedule:
    """A threshold that walks through given values: forces kept and skipped steps."""

    def __init__(self, values):
        self.values, self.step = list(values), 0

    def value(self):
        return self.values[self.step % len(self.values)]

    def observe(self, result):
        self.step += 1

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


TAUS = [2.0, 0.97, 0.0, 0.97, 1.0, 0.97]


def batch(step: int, rank: int, size: int):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(size, 7, generator=gen)
    y = torch.randint(0, 3, (size,), generator=gen)
    return x, y


def state_equal_across_ranks(model: nn.Module) -> bool:
    """Parameters and buffers, bit for bit, in one collective."""
    state = [t.detach().double().reshape(-1) for t in model.state_dict().values()]
    return all_equal_across_ranks(torch.cat(state))


def _training_checks(rank: int, n: int) -> None:
    loss_fn = nn.functional.cross_entropy
    m, b = 2, 8  # micro-batches per rank, samples per micro-batch

    # Different initialisation on every rank: construction broadcasts rank 0's parameters.
    torch.manual_seed(rank)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    collector = DistributedGradientCollector(model.parameters(), tau=TauSchedule(TAUS),
                                             buffers=model, buffer_sync="mean")
    assert state_equal_across_ranks(model)
    # The one-process simulation: all N·m micro-batches, rank-major, on one model.
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_collector = gaf.GradientCollector(ref.parameters(), tau=TauSchedule(TAUS), mode="stacked")
    skipped = []
    for step in range(len(TAUS)):
        for k in range(m):
            x, y = batch(step, rank * m + k, b)
            loss_fn(model(x), y).backward()
            collector.collect()
        result = collector.finish()
        for i in range(n * m):
            x, y = batch(step, i, b)
            loss_fn(ref(x), y).backward()
            ref_collector.collect()
        ref_result = ref_collector.finish()
        same_decision(result, ref_result)
        skipped.append(result.skipped)
        if result.skipped:
            assert all(p.grad is None for p in model.parameters())
        else:
            assert model.unused.weight.grad is not None  # zeros: it got no gradient
            assert not model.unused.weight.grad.any()
            opt.step()
        if not ref_result.skipped:
            ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        # The same bits on every rank (buffers too), and the same bits as one process over
        # all the data.
        assert state_equal_across_ranks(model)
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            assert torch.equal(p, q), step
    assert skipped == [False, skipped[1], True, skipped[3], skipped[4], skipped[5]]
    assert not all(skipped[1:]), skipped  # some tau 0.97 steps went through
    assert collector.stats.steps == len(TAUS) and collector.stats.skipped_steps == sum(skipped)
    # With "mean" buffer sync, a running mean ends as the mean over ranks of the local ones.
    local = copy.deepcopy(model)
    for k in range(m):
        x, y = batch(100, rank * m + k, b)
        with torch.no_grad():
            local(x)
        loss_fn(model(x), y).backward()
        collector.collect()
    collector.finish()
    expected = local.bn.running_mean.clone()
    dist.all_reduce(expected)
    torch.testing.assert_close(model.bn.running_mean, expected / n)
    assert not torch.equal(local.bn.running_mean, model.bn.running_mean)

    # The one-call trainer, on a plain model and on a DDP-wrapped one (under no_sync, so
    # DDP's all-reduce never runs), against GAFTrainer over all the data in one process.
    torch.manual_seed(0)
    base = Net()
    models = [copy.deepcopy(base) for _ in range(3)]
    ddp = nn.parallel.DistributedDataParallel(models[1])
    trainers = [
        DistributedGAFTrainer(models[0], torch.optim.SGD(models[0].parameters(), lr=0.1), loss_fn,
                              m, tau=0.97),
        DistributedGAFTrainer(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), loss_fn, m,
                              tau=0.97, method="allgather"),
    ]
    one = gaf.GAFTrainer(models[2], torch.optim.SGD(models[2].parameters(), lr=0.1), loss_fn,
                         n * m, tau=0.97, mode="stacked")
    for step in range(3):
        xs, ys = zip(*(batch(50 + step, i, m * b) for i in range(n)), strict=True)
        outs = [t.step(xs[rank], ys[rank]) for t in trainers]
        ref_out = one.step(torch.cat(xs), torch.cat(ys))
        for out in outs:
            assert torch.equal(out.result.accepted, ref_out.result.accepted)
        for model in models[:2]:
            assert state_equal_across_ranks(model)
            for p, q in zip(model.parameters(), models[2].parameters(), strict=True):
                assert torch.equal(p, q), step

    # A different model on one rank: a clear error on every rank at construction.
    other = Net(hidden=14 if rank == n - 1 else 13)
    expect_error(lambda: DistributedGradientCollector(other.parameters()), "parameter shapes",
                 "P (elements")


@pytest.mark.parametrize("world_size", [2, 4])
def test_training_matches_one_process(tmp_path, world_size):
    spawn(_training_checks, world_size, tmp_path)


# -- failures: a rank that dies or stops -------------------------------------------------


def _dead_rank(rank: int, n: int, scenario: str, result_file: str) -> None:
    x = torch.randn(1, 1000)
    if rank == 1:
        if scenario == "exits":
            os._exit(0)  # dies without a word: its sockets close
        time.sleep(3.5)  # "hangs": alive but never joins the step
        os._exit(0)
    start = time.monotonic()
    try:
        filter_gradients_distributed(x, 0.97, timeout=1.5 if scenario == "hangs" else None)
    except GAFDistributedError as exc:
        with open(result_file, "w") as f:
            f.write(f"{time.monotonic() - start}\n{exc}")
        os._exit(0)  # the group is broken; skip its teardown
    raise AssertionError("a dead peer went unnoticed")


@pytest.mark.parametrize("scenario", ["exits", "hangs"])
def test_dead_rank_fails_within_timeout(tmp_path, scenario):
    out = tmp_path / "result.txt"
    spawn(_dead_rank, 2, tmp_path, scenario, str(out))
    elapsed, message = out.read_text().split("\n", 1)
    # "exits": the closed connection is noticed at once (well within the 60 s group
    # timeout); "hangs": the 1.5 s collective timeout fires.
    assert float(elapsed) < (5.0 if scenario == "hangs" else PG_TIMEOUT_S / 2), elapsed
    if scenario == "hangs":
        assert float(elapsed) >= 1.4
    assert "GAF rank 0/2" in message and "cross-rank check" in message, message
    if scenario == "exits":  # a reset connection is named as such, not as a timeout
        assert "reset or closed" in message and "died" in message, message
        assert "timeout" not in message.split("(no timeout expired)")[0], message
        assert "(no timeout expired)" in message
    else:
        assert "timed out after" in message and "timeout=1.5 s" in message, message
