"""A run interrupted at any step and resumed from its checkpoint ends as the uninterrupted run:
same history (wall-clock fields aside), same parameters bit for bit."""

from __future__ import annotations

import pytest
import torch

from gaflab import checkpoint as ck
from gaflab.config import TrainConfig
from gaflab.prepare import prepare_data
from gaflab.train import train

TIME_FIELDS = ("epoch_seconds",)


def tiny(fmnist_dir, **kw) -> TrainConfig:
    # 320 training images, 2 x 16 per step: 10 steps an epoch
    base = dict(data_dir=str(fmnist_dir), train_size=None, epochs=3, micro_batch_size=16,
                num_micro_batches=2, lr=0.05, progress=False, threads=1, width=4,
                checkpoint_every=3)
    base.update(kw)
    return TrainConfig(**base)


class Interrupt(Exception):
    pass


def interrupt_after(forwards: int):
    """An epoch hook that makes the model raise at its ``forwards``-th training forward,
    like a kill between two checkpoints."""
    def hook(epoch, model):
        if epoch != 0:
            return
        count = [0]

        def pre(module, args):
            if module.training:
                count[0] += 1
                if count[0] == forwards:
                    raise Interrupt
        model.register_forward_pre_hook(pre)
    return hook


def without_time(history):
    return [{k: v for k, v in row.items() if k not in TIME_FIELDS} for row in history]


def same_rows(a, b):
    assert len(a) == len(b)
    for x, y in zip(without_time(a), without_time(b), strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == y[k] or (x[k] != x[k] and y[k] != y[k]), k  # NaN == NaN


def assert_same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# forward 15 is in epoch 1 (step 8, after the step-6 checkpoint); forward 27 in epoch 2
# (step 14, after the end-of-epoch-1 checkpoint and the step-12 one).
@pytest.mark.parametrize("changes,forwards", [
    ({"method": "gaf", "threshold": "quantile:target_acceptance=0.5,min_samples=4,window=16"},
     15),
    ({"method": "average"}, 27),
    ({"method": "random-drop", "control_rate": 0.4, "num_micro_batches": 4,
      "micro_batch_size": 8}, 27),
    ({"method": "small-loss", "forget_epochs": 2}, 27),
    ({"method": "gaf", "amp": "fp16", "epochs": 2}, 15),
])
def test_interrupted_and_resumed_equals_uninterrupted(fmnist_dir, tmp_path, changes, forwards):
    cfg = tiny(fmnist_dir, **changes)
    data = prepare_data(cfg)
    full = train(cfg.replace(), data)
    with pytest.raises(Interrupt):
        train(cfg.replace(), data, epoch_hook=interrupt_after(forwards),
              checkpoint_dir=tmp_path, resume=False)
    state, _ = ck.load_latest(tmp_path)
    assert state["epoch"] is not None or forwards > 20  # resumes inside an epoch too
    resumed = train(cfg.replace(), data, checkpoint_dir=tmp_path, resume=True)
    same_rows(resumed.history, full.history)
    assert resumed.distance_trace == full.distance_trace
    assert (resumed.steps, resumed.skipped_steps) == (full.steps, full.skipped_steps)
    assert_same_params(resumed.model, full.model)


def test_resume_of_a_finished_run_changes_nothing(fmnist_dir, tmp_path):
    cfg = tiny(fmnist_dir, epochs=1)
    first = train(cfg.replace(), checkpoint_dir=tmp_path)
    again = train(cfg.replace(), checkpoint_dir=tmp_path, resume=True)
    same_rows(again.history, first.history)
    assert_same_params(again.model, first.model)


def test_resume_under_another_config_is_refused_naming_the_field(fmnist_dir, tmp_path):
    cfg = tiny(fmnist_dir, epochs=1)
    train(cfg.replace(), checkpoint_dir=tmp_path)
    with pytest.raises(ck.CheckpointMismatchError, match=r"lr: 0\.05 in the checkpoint, 0\.1 now"):
        train(cfg.replace(lr=0.1), checkpoint_dir=tmp_path, resume=True)
    # a result-neutral field may change
    train(cfg.replace(threads=2, progress=False, name="renamed"), checkpoint_dir=tmp_path,
          resume=True)


def test_resume_from_a_truncated_newest_uses_the_previous(fmnist_dir, tmp_path, capsys):
    cfg = tiny(fmnist_dir, epochs=2, checkpoint_every=None)
    full = train(cfg.replace(), checkpoint_dir=tmp_path)
    last = tmp_path / ck.LAST
    last.write_bytes(last.read_bytes()[:1000])  # the end-of-epoch-2 checkpoint, cut short
    resumed = train(cfg.replace(), checkpoint_dir=tmp_path, resume=True)  # redoes epoch 2
    assert "truncated" in capsys.readouterr().err
    same_rows(resumed.history, full.history)
    assert_same_params(resumed.model, full.model)


def test_resume_without_a_directory_is_an_error(fmnist_dir):
    with pytest.raises(ValueError, match="checkpoint directory"):
        train(tiny(fmnist_dir, epochs=1), resume=True)
