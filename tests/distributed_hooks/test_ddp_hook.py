"""The DDP communication hook against one-process filtering, in real gloo processes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import gaf
from gaf.distributed import GAFDistributedError, GAFHookState, gaf_hook


def check_steps(steps: list[dict], half: bool = False) -> None:
    for step in steps:
        assert step["accepted"] == step["ref_accepted"], step
        assert step["skipped"] == step["ref_skipped"], step
        # The same bits as gaf.filter_gradients' direction; in half precision up to the
        # last bit of the weighted sum.
        assert step["close"] if half else step["equal"], step
        assert step["ranks_identical"], step


@pytest.mark.parametrize("case", ["buckets", "bucket_view", "all_gather", "neighbours",
                                  "bfloat16", "float16", "unused"])
def test_grad_equals_filter_gradients_over_rank_gradients(report, case):
    steps = report[case]
    check_steps(steps, half=case in ("bfloat16", "float16"))
    assert all(step["buckets"] >= 2 for step in steps[1:]), steps  # after DDP's rebuild


def test_several_buckets_and_their_rebuild(report):
    counts = [step["buckets"] for step in report["buckets"]]
    assert counts[0] == 1 and counts[1] >= 2, counts  # DDP rebuilt its buckets after step 1


def test_steps_both_taken_and_skipped(report):
    steps = report["buckets"]
    assert any(s["skipped"] for s in steps) and not all(s["skipped"] for s in steps), steps
    if report["world"] == 4:  # and a taken step that left a rank out
        assert any(2 <= sum(s["accepted"]) < 4 for s in steps), steps


def test_nonfinite_rank_gradient_is_an_overflow(report):
    found = report["overflow"]
    assert found["skipped"] and found["overflow"] and found["nonfinite"] == 1
    assert found["all_inf"]


def test_blind_control_verdicts_as_in_filter_gradients(report):
    steps = report["control"]
    for step in steps:
        assert step["accepted"] == step["ref_accepted"] and step["equal"], step
    assert len({tuple(s["accepted"]) for s in steps}) > 1  # the draws differ between steps


def test_unused_parameter_keeps_no_grad(report):
    assert all(step["never_grad_is_none"] for step in report["unused"])


def test_no_sync_accumulation_filters_the_accumulated_gradient(report):
    step = report["no_sync"]
    check_steps([step])
    assert step["steps_before_sync"] == 0 and step["steps"] == 1


def test_tau_2_is_ddp_mean(report):
    for step in report["tau2"]:
        assert all(step["accepted"])
        # Two ranks: 0.5·a + 0.5·b is exactly (a + b) / 2; four: the same up to the order
        # of the additions.
        assert step["equal"] if report["world"] == 2 else step["close"], step


def test_skipped_step_leaves_parameters_and_optimizer_state(report):
    skip = report["skip"]
    assert skip["first_taken"] and skip["skipped"]
    assert skip["grads_zero"] and skip["params_untouched"] and skip["momentum_untouched"]
    assert skip["stats"]["steps"] == 2 and skip["stats"]["skipped_steps"] == 1


# -- one process: the errors and the guard --------------------------------------------------


def test_hook_state_takes_a_spec_or_its_keywords():
    spec = gaf.FilterSpec(tau=0.5, rule="anchor")
    assert GAFHookState(spec).spec is spec
    assert GAFHookState(tau=0.5, rule="anchor").spec == spec
    with pytest.raises(ValueError, match="both spec="):
        GAFHookState(spec, tau=0.3)
    with pytest.raises(ValueError, match="cosine"):
        GAFHookState(gaf.FilterSpec(measure="sign"))
    with pytest.raises(ValueError, match="chunk_elements"):
        GAFHookState(chunk_elements=0)
    with pytest.raises(ValueError, match="unknown gather"):
        GAFHookState(gather="ring")


def test_hook_needs_its_state():
    with pytest.raises(TypeError, match="GAFHookState"):
        gaf_hook(object(), None)


def test_hook_without_process_group_fails_clearly():
    assert not dist.is_initialized()
    with pytest.raises(GAFDistributedError, match="init_process_group"):
        GAFHookState().comm()


def test_guard_skips_once_then_steps():
    p = torch.nn.Parameter(torch.ones(3))
    state = GAFHookState(tau=0.5)
    opt = state.wrap_optimizer(torch.optim.SGD([p], lr=1.0, momentum=0.9))
    assert state.wrap_optimizer(opt) is opt  # idempotent
    with pytest.raises(ValueError, match="another GAF state"):
        GAFHookState().wrap_optimizer(opt)
    p.grad = torch.ones(3)
    state._pending = "skip"
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and not opt.state[p]
    opt.step()  # no decision since: passes through
    assert torch.equal(p.detach(), torch.zeros(3))
    # A closure runs (its backward is what decides), and its loss comes back.
    state._pending = "skip"
    assert opt.step(lambda: torch.tensor(7.0)).item() == 7.0
    assert torch.equal(p.detach(), torch.zeros(3))
    # Schedulers wrap step as a bound method: still guarded after that.
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1)
    state._pending = "skip"
    opt.step()
    scheduler.step()
    assert torch.equal(p.detach(), torch.zeros(3))
