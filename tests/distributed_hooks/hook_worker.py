"""One rank of the DDP hook and FSDP2 checks (run under torchrun by conftest.py, once per
world size, for test_ddp_hook.py and test_fsdp.py).

Every DDP check: small buckets, each rank its own data, the GAF hook registered; after
backward each .grad is compared with gaf.filter_gradients over the N ranks' local
gradients, computed independently on a plain copy of the model and all-gathered. The FSDP2
checks are in fsdp_checks.py. Rank 0 writes the findings to OUT/hook_worker.json.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import fsdp_checks
import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import (
    finish,
    flat_grads,
    gather_rows,
    make_net,
    rank_batch,
    reference,
    same_on_all_ranks,
)
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gaf
from gaf.distributed import GAFHookState, gaf_hook

TINY_BUCKET_MB = 0.0005  # 500 B: several buckets a step once DDP has rebuilt them


def local_grad(ref: nn.Module, module: nn.Module, batches) -> torch.Tensor:
    """This rank's gradient on a plain copy holding the DDP model's current values."""
    with torch.no_grad():
        for a, b in zip(ref.parameters(), module.parameters()):
            a.copy_(b)
    ref.zero_grad(set_to_none=True)
    for x, y in batches:
        F.cross_entropy(ref(x), y).backward()
    return flat_grads(ref.parameters())


def compare(ddp, ref, state, batches, spec) -> dict:
    mine = local_grad(ref, ddp.module, batches)
    want = reference(mine, spec)
    got = flat_grads(ddp.module.parameters())
    # A skipped step's buckets are completed with zeros (the guard skips the step).
    expected = torch.zeros_like(want.grad) if want.skipped else want.grad
    same = torch.equal(got, expected)
    # Half precision: torch may round a block's vector body and scalar tail differently,
    # so the last bit can differ from one device's sum (as in gaf.distributed.protocol).
    close = torch.allclose(got.float(), expected.float(), rtol=2e-3, atol=1e-6)
    return {
        "equal": bool(same), "close": bool(close),
        "max_diff": float((got.double() - expected.double()).abs().max()),
        "accepted": state.result.accepted.tolist(),
        "ref_accepted": want.accepted.tolist(),
        "skipped": state.skipped, "ref_skipped": want.skipped,
        "buckets": state.result.extra["buckets"],
        "ranks_identical": same_on_all_ranks(got),
    }


def run_steps(spec, steps=3, dtype=torch.float32, hook_kwargs=None, **ddp_kwargs
              ) -> list[dict]:
    rank = dist.get_rank()
    net = make_net(dtype=dtype)
    ref = copy.deepcopy(net)
    ddp = DDP(net, bucket_cap_mb=TINY_BUCKET_MB, **ddp_kwargs)
    state = GAFHookState(spec, **(hook_kwargs or {}))
    ddp.register_comm_hook(state, gaf_hook)
    optimizer = state.wrap_optimizer(torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9))
    found = []
    for step in range(steps):
        x, y = rank_batch(rank, step, dtype=dtype)
        F.cross_entropy(ddp(x), y).backward()
        found.append(compare(ddp, ref, state, [(x, y)], spec))
        optimizer.step()
        optimizer.zero_grad()
    return found


class Branchy(nn.Module):
    """A parameter no rank uses and one only rank 0 uses (find_unused_parameters)."""

    def __init__(self):
        super().__init__()
        self.body = make_net()
        self.never = nn.Linear(6, 3)
        self.rank0 = nn.Linear(6, 3)

    def forward(self, x):
        out = self.body(x)
        return out + self.rank0(x) if dist.get_rank() == 0 else out


def check_unused(spec) -> list[dict]:
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = Branchy()
    ref = copy.deepcopy(net)
    ddp = DDP(net, bucket_cap_mb=TINY_BUCKET_MB, find_unused_parameters=True)
    state = GAFHookState(spec)
    ddp.register_comm_hook(state, gaf_hook)
    found = []
    for step in range(2):
        x, y = rank_batch(rank, step)
        F.cross_entropy(ddp(x), y).backward()
        result = compare(ddp, ref, state, [(x, y)], spec)
        result["never_grad_is_none"] = all(p.grad is None for p in net.never.parameters())
        found.append(result)
        ddp.zero_grad(set_to_none=True)
    return found


def check_no_sync(spec) -> dict:
    rank = dist.get_rank()
    net = make_net()
    ref = copy.deepcopy(net)
    ddp = DDP(net, bucket_cap_mb=TINY_BUCKET_MB)
    state = GAFHookState(spec)
    ddp.register_comm_hook(state, gaf_hook)
    batches = [rank_batch(rank, 10), rank_batch(rank, 11)]
    with ddp.no_sync():
        F.cross_entropy(ddp(batches[0][0]), batches[0][1]).backward()
    decided_before = state.stats.steps
    F.cross_entropy(ddp(batches[1][0]), batches[1][1]).backward()
    result = compare(ddp, ref, state, batches, spec)
    result["steps_before_sync"] = decided_before
    result["steps"] = state.stats.steps
    return result


def check_tau2_is_ddp_mean() -> dict:
    rank = dist.get_rank()
    plain = DDP(make_net(), bucket_cap_mb=TINY_BUCKET_MB)
    hooked = DDP(make_net(), bucket_cap_mb=TINY_BUCKET_MB)
    state = GAFHookState(tau=2.0)
    hooked.register_comm_hook(state, gaf_hook)
    found = []
    for step in range(2):
        x, y = rank_batch(rank, step)
        for model in (plain, hooked):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        a, b = flat_grads(plain.parameters()), flat_grads(hooked.parameters())
        found.append({"equal": bool(torch.equal(a, b)),
                      "close": bool(torch.allclose(a, b, rtol=1e-6, atol=1e-7)),
                      "accepted": state.result.accepted.tolist()})
    return found


def check_skip() -> dict:
    """A step nothing agrees on: state.skipped, parameters and momentum untouched."""
    rank = dist.get_rank()
    net = make_net()
    ddp = DDP(net, bucket_cap_mb=TINY_BUCKET_MB)
    state = GAFHookState(tau=gaf.StepThreshold([2.0, 0.0], [1]))  # tau 2, then tau 0
    ddp.register_comm_hook(state, gaf_hook)
    optimizer = state.wrap_optimizer(torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9))
    x, y = rank_batch(rank, 0)
    F.cross_entropy(ddp(x), y).backward()  # a taken step, so momentum buffers exist
    optimizer.step()
    optimizer.zero_grad()
    taken = not state.skipped
    # Opposed gradients on the two halves of the ranks: at tau 0 nothing agrees.
    before = [p.detach().clone() for p in net.parameters()]
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in net.parameters()]
    x, y = rank_batch(rank, 1)
    loss = F.cross_entropy(ddp(x), y) * (1.0 if rank % 2 == 0 else -1.0)
    loss.backward()
    skipped, result = state.skipped, state.result
    grads_zero = all(bool((p.grad == 0).all()) for p in net.parameters())
    optimizer.step()
    untouched = all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
    momentum_untouched = all(torch.equal(m, optimizer.state[p]["momentum_buffer"])
                             for m, p in zip(momentum, net.parameters()))
    return {"first_taken": taken, "skipped": skipped, "accepted": result.accepted.tolist(),
            "grads_zero": grads_zero, "params_untouched": untouched,
            "momentum_untouched": momentum_untouched, "stats": state.stats.state_dict()}


def check_overflow() -> dict:
    """A rank whose gradient is not finite: reported as an overflow, buckets filled with
    inf (as DDP's mean would be, so a GradScaler backs off), the step skipped."""
    rank = dist.get_rank()
    ddp = DDP(make_net(), bucket_cap_mb=TINY_BUCKET_MB)
    state = GAFHookState(tau=2.0)
    ddp.register_comm_hook(state, gaf_hook)
    x, y = rank_batch(rank, 0)
    scale = float("inf") if rank == 1 else 1.0
    (F.cross_entropy(ddp(x), y) * scale).backward()
    return {"skipped": state.skipped, "overflow": state.result.extra["overflow"],
            "nonfinite": state.result.num_nonfinite,
            "all_inf": all(bool(torch.isinf(p.grad).all()) for p in ddp.parameters())}


def check_control() -> list[dict]:
    """A blind control's verdicts (same seed on every rank) replace the test, as in
    gaf.filter_gradients with the same draws."""
    rank, n = dist.get_rank(), dist.get_world_size()
    net = make_net()
    ref = copy.deepcopy(net)
    ddp = DDP(net, bucket_cap_mb=TINY_BUCKET_MB)
    state = GAFHookState(tau=2.0, control=gaf.RandomDrop(0.4, seed=3))
    ddp.register_comm_hook(state, gaf_hook)
    twin = gaf.RandomDrop(0.4, seed=3)
    found = []
    for step in range(4):
        x, y = rank_batch(rank, step)
        F.cross_entropy(ddp(x), y).backward()
        rows = gather_rows(local_grad(ref, ddp.module, [(x, y)]))
        want = gaf.filter_gradients(rows, 2.0, verdicts=twin.draw(n))
        expected = torch.zeros_like(want.grad) if want.skipped else want.grad
        found.append({"accepted": state.result.accepted.tolist(),
                      "ref_accepted": want.accepted.tolist(),
                      "equal": bool(torch.equal(flat_grads(ddp.module.parameters()), expected))})
        ddp.zero_grad(set_to_none=True)
    return found


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    spec = gaf.FilterSpec(tau=0.9)  # rank gradients of this net agree at about this level
    report = {
        "world": dist.get_world_size(),
        "buckets": run_steps(spec),
        "bucket_view": run_steps(spec, gradient_as_bucket_view=True),
        # The gather NCCL gets (all_gather of equal blocks, a padded short chunk), and
        # chunks smaller than the buckets.
        "all_gather": run_steps(spec, hook_kwargs=dict(gather="all_gather",
                                                       chunk_elements=100)),
        "neighbours": run_steps(gaf.FilterSpec(tau=0.9, rule="neighbours"), steps=2),
        "bfloat16": run_steps(spec, steps=2, dtype=torch.bfloat16),
        "float16": run_steps(spec, steps=2, dtype=torch.float16),
        "overflow": check_overflow(),
        "control": check_control(),
        "unused": check_unused(spec),
        "no_sync": check_no_sync(spec),
        "tau2": check_tau2_is_ddp_mean(),
        "skip": check_skip(),
        **fsdp_checks.run_all(),
    }
    finish(out, "hook_worker", report)


if __name__ == "__main__":
    main()
