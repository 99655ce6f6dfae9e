"""FSDP2 + GAF's reduce-scatter against the DDP hook and one-process filtering, in real
gloo processes (2 and 4 ranks, see conftest.py)."""

from __future__ import annotations

import pytest
import torch

from gaf.distributed import GAFFSDPState


def check(step: dict) -> None:
    assert step["accepted"] == step["ref_accepted"], step
    assert step["skipped"] == step["ref_skipped"], step
    assert step["equal"], step


def test_fsdp_equals_ddp_hook_and_filter_gradients(report):
    steps = report["fsdp_vs_ddp"]
    for step in steps:
        check(step)
        assert step["equal_ddp"] and step["accepted"] == step["ddp_accepted"], step
        assert step["units"] == 3, step  # one reduce-scatter per sharded Linear
        assert step["copied"] == 0, step  # float32: each sharded .grad views GAF's output
    assert any(s["skipped"] for s in steps) and not all(s["skipped"] for s in steps)
    assert steps[-1]["params_equal_ddp"]


def test_reduce_dtype_cast_writes_the_copied_grad(report):
    steps = report["fsdp_reduce_bf16"]
    for k, step in enumerate(steps, start=1):
        check(step)
        assert step["ranks_identical"]
        assert step["copied"] == 6 * k, step  # FSDP cast each shard: 6 tensors written


def test_shards_held_in_bfloat16(report):
    for step in report["fsdp_shard_bf16"]:
        check(step)
        assert step["ranks_identical"] and step["copied"] == 0


def test_accumulation_without_sync_filters_the_accumulated_gradient(report):
    step = report["fsdp_accumulation"]
    assert step["equal"] and step["accepted"] == step["ref_accepted"], step
    assert step["steps_before"] == 0 and step["steps"] == 1


def test_skipped_step_leaves_parameters_and_optimizer_state(report):
    skip = report["fsdp_skip"]
    assert skip["first_taken"] and skip["skipped"] and skip["grads_zero"]
    assert skip["params_untouched"] and skip["momentum_untouched"]


def test_nonfinite_rank_gradient_is_an_overflow(report):
    found = report["fsdp_overflow"]
    assert found["skipped"] and found["overflow"] and found["nonfinite"] == 1
    assert found["all_inf"]


def test_unsupported_settings_fail_clearly(report):
    refusals = report["fsdp_refusals"]
    assert "needs op AVG" in refusals["float16"] and "reduce_dtype=torch.float32" \
        in refusals["float16"]
    assert refusals["first_backward_ok"]
    assert "set_requires_gradient_sync(False)" in refusals["accumulate"]


def test_fsdp_state_checks_its_arguments():
    with pytest.raises(ValueError, match="shard_dtype"):
        GAFFSDPState(shard_dtype=torch.int8)
    with pytest.raises(ValueError, match="no fully_shard unit"):
        GAFFSDPState().register(torch.nn.Linear(2, 2))
