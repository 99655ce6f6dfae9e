"""FSDP2 checks, run by hook_worker.py in every rank: GAF's reduce-scatter against the DDP
hook and against gaf.filter_gradients over the ranks' local gradients."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import flat_grads, gather_rows, make_net, rank_batch, same_on_all_ranks
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import gaf
from gaf.distributed import GAFFSDPState, GAFHookState, gaf_hook


def shard(net, **kwargs):
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, **kwargs)
    fully_shard(net, **kwargs)
    return net


def full_params(net) -> list[torch.Tensor]:
    return [p.full_tensor().detach() for p in net.parameters()]


def local_grad(ref, values, batches) -> torch.Tensor:
    with torch.no_grad():
        for a, v in zip(ref.parameters(), values):
            a.copy_(v)
    ref.zero_grad(set_to_none=True)
    for x, y in batches:
        F.cross_entropy(ref(x), y).backward()
    return flat_grads(ref.parameters())


def expected(local: torch.Tensor, spec, prepare=None) -> torch.Tensor:
    """filter_gradients over the ranks' gradients (``prepare``: how the path rounds them);
    zeros for a skipped step."""
    rows = gather_rows(local)
    if prepare is not None:
        rows = prepare(rows)
    result = gaf.filter_gradients(rows, spec.tau, spec.rule)
    grad = torch.zeros_like(result.grad) if result.skipped else result.grad
    return grad.to(local.dtype), result


def check_against_ddp(spec, steps=3) -> list[dict]:
    """FSDP2 + GAF and DDP + gaf_hook from the same start on the same data: the same
    gradients, decisions and parameters, equal to one-process filtering."""
    rank = dist.get_rank()
    net = make_net()
    ref, twin = copy.deepcopy(net), copy.deepcopy(net)
    model = shard(net)
    state = GAFFSDPState(spec).register(model)
    ddp = DDP(twin, bucket_cap_mb=0.0005)
    hook_state = GAFHookState(spec)
    ddp.register_comm_hook(hook_state, gaf_hook)
    opt = state.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    ddp_opt = hook_state.wrap_optimizer(torch.optim.SGD(ddp.parameters(), lr=0.1,
                                                        momentum=0.9))
    found = []
    for step in range(steps):
        x, y = rank_batch(rank, step)
        values = full_params(model)
        F.cross_entropy(model(x), y).backward()
        F.cross_entropy(ddp(x), y).backward()
        got, from_ddp = flat_grads(model.parameters()), flat_grads(ddp.module.parameters())
        want, result = expected(local_grad(ref, values, [(x, y)]), spec)
        found.append({
            "equal": bool(torch.equal(got, want)), "equal_ddp": bool(torch.equal(got, from_ddp)),
            "accepted": state.result.accepted.tolist(), "ref_accepted": result.accepted.tolist(),
            "ddp_accepted": hook_state.result.accepted.tolist(),
            "skipped": state.skipped, "ref_skipped": result.skipped,
            "units": state.result.extra["units"], "copied": state.copied,
        })
        opt.step()
        opt.zero_grad()
        ddp_opt.step()
        ddp_opt.zero_grad()
    found[-1]["params_equal_ddp"] = all(
        torch.equal(a, b) for a, b in zip(full_params(model), ddp.module.parameters()))
    return found


def check_rounded(spec, prepare, **state_or_policy) -> list[dict]:
    """Paths that round the shards: reduce_dtype=bfloat16 (FSDP casts the reduced shard,
    so the sharded .grad is a copy GAF writes directly) and shard_dtype=bfloat16."""
    rank = dist.get_rank()
    net = make_net()
    ref = copy.deepcopy(net)
    policy = state_or_policy.pop("mp_policy", None)
    model = shard(net, **({"mp_policy": policy} if policy is not None else {}))
    state = GAFFSDPState(spec, **state_or_policy).register(model)
    found = []
    for step in range(2):
        x, y = rank_batch(rank, step)
        values = full_params(model)
        F.cross_entropy(model(x), y).backward()
        got = flat_grads(model.parameters())
        want, result = expected(local_grad(ref, values, [(x, y)]), spec, prepare)
        found.append({"equal": bool(torch.equal(got, want)), "skipped": state.skipped,
                      "accepted": state.result.accepted.tolist(),
                      "ref_accepted": result.accepted.tolist(), "ref_skipped": result.skipped,
                      "copied": state.copied, "ranks_identical": same_on_all_ranks(got)})
        model.zero_grad(set_to_none=True)
    return found


def check_accumulation(spec) -> dict:
    """Micro-batches accumulated with set_requires_gradient_sync(False): one decision, over
    the accumulated gradients."""
    rank = dist.get_rank()
    net = make_net()
    ref = copy.deepcopy(net)
    model = shard(net)
    state = GAFFSDPState(spec).register(model)
    batches = [rank_batch(rank, 20), rank_batch(rank, 21)]
    values = full_params(model)
    model.set_requires_gradient_sync(False)
    F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    before = state.stats.steps
    model.set_requires_gradient_sync(True)
    F.cross_entropy(model(batches[1][0]), batches[1][1]).backward()
    got = flat_grads(model.parameters())
    want, result = expected(local_grad(ref, values, batches), spec)
    return {"equal": bool(torch.equal(got, want)), "steps_before": before,
            "steps": state.stats.steps, "accepted": state.result.accepted.tolist(),
            "ref_accepted": result.accepted.tolist()}


def check_skip() -> dict:
    rank = dist.get_rank()
    model = shard(make_net())
    state = GAFFSDPState(tau=gaf.StepThreshold([2.0, 0.0], [1])).register(model)
    opt = state.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    x, y = rank_batch(rank, 0)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    first_taken = not state.skipped
    before = full_params(model)
    momentum = [opt.state[p]["momentum_buffer"].full_tensor() for p in model.parameters()]
    x, y = rank_batch(rank, 1)
    F.cross_entropy(model(x), y).backward()
    skipped = state.skipped
    grads_zero = bool((flat_grads(model.parameters()) == 0).all())
    opt.step()
    return {"first_taken": first_taken, "skipped": skipped, "grads_zero": grads_zero,
            "params_untouched": all(torch.equal(a, b)
                                    for a, b in zip(before, full_params(model))),
            "momentum_untouched": all(
                torch.equal(m, opt.state[p]["momentum_buffer"].full_tensor())
                for m, p in zip(momentum, model.parameters()))}


def check_overflow() -> dict:
    """A rank whose gradient is not finite: an overflow, every shard inf, step skipped."""
    rank = dist.get_rank()
    model = shard(make_net())
    state = GAFFSDPState(tau=2.0).register(model)
    x, y = rank_batch(rank, 0)
    (F.cross_entropy(model(x), y) * (float("inf") if rank == 1 else 1.0)).backward()
    return {"skipped": state.skipped, "overflow": state.result.extra["overflow"],
            "nonfinite": state.result.num_nonfinite,
            "all_inf": bool(torch.isinf(flat_grads(model.parameters())).all())}


def check_refusals() -> dict:
    """Settings GAF cannot honour fail on every rank with a message that names the fix."""
    rank = dist.get_rank()
    found = {}
    model = shard(make_net(), mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float16))
    GAFFSDPState(tau=0.9).register(model)
    x, y = rank_batch(rank, 0)
    try:
        F.cross_entropy(model(x), y).backward()
        found["float16"] = "no error"
    except ValueError as exc:
        found["float16"] = str(exc)
    model = shard(make_net())
    state = GAFFSDPState(tau=2.0).register(model)
    F.cross_entropy(model(x), y).backward()
    found["first_backward_ok"] = state.stats.steps == 1
    try:  # a second backward without zero_grad: FSDP would add to the sharded .grad
        F.cross_entropy(model(x), y).backward()
        found["accumulate"] = "no error"
    except RuntimeError as exc:
        found["accumulate"] = str(exc)
    return found


def run_all() -> dict:
    spec = gaf.FilterSpec(tau=0.9)
    return {
        "fsdp_vs_ddp": check_against_ddp(spec),
        # Reduced in bfloat16: shards and their weighted sum in bfloat16, cast by FSDP.
        "fsdp_reduce_bf16": check_rounded(
            spec, lambda rows: rows.bfloat16(),
            mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)),
        # Shards held in bfloat16, summed in the float32 of the gradient.
        "fsdp_shard_bf16": check_rounded(spec, lambda rows: rows.bfloat16().float(),
                                         shard_dtype=torch.bfloat16),
        "fsdp_accumulation": check_accumulation(spec),
        "fsdp_skip": check_skip(),
        "fsdp_overflow": check_overflow(),
        "fsdp_refusals": check_refusals(),
    }
