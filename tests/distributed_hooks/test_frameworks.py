"""GAF's DDP hook through accelerate, the Hugging Face Trainer and Lightning, in 2 real gloo
processes, against gaf.filter_gradients over the ranks' gradients (frameworks_worker.py)."""

from __future__ import annotations

import pytest

from .common import launch


@pytest.fixture(scope="module")
def frameworks(tmp_path_factory):
    return launch("frameworks_worker.py", 2, tmp_path_factory.mktemp("frameworks"))


@pytest.mark.parametrize("framework", ["accelerate", "transformers", "lightning"])
def test_framework_run_equals_one_process_filtering(frameworks, framework):
    report = frameworks[framework]
    assert all(report["same_as_replay"]), report  # bit for bit, every parameter
    assert report["stats"] == report["replay_stats"], report
    assert report["ranks_identical"]
    stats = report["stats"]
    assert stats["steps"] == 6 and 0 < stats["skipped_steps"] < 6, stats  # both kinds
    assert stats["micro_batches"] == 2 * stats["steps"]  # one row per rank


def test_accelerate_skip_flag_follows_gaf(frameworks):
    assert frameworks["accelerate"]["skip_flag_agrees"]


def test_register_needs_a_ddp_model():
    import torch

    from gaf.integrations.ddp_hook import register_gaf_hook

    with pytest.raises(ValueError, match="DistributedDataParallel"):
        register_gaf_hook(torch.nn.Linear(2, 2), None, tau=0.5)
