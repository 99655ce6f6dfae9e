"""Checkpoint files: atomic rotation, damage detection, config refusal, RNG round trips."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from gaflab import checkpoint as ck
from gaflab.config import TrainConfig


def _state(tag: int) -> dict:
    return {"tag": tag, "weights": torch.arange(1000, dtype=torch.float32) * tag,
            "history": [{"epoch": 1, "test_acc": 0.5, "memorised": float("nan")}]}


def test_round_trip_and_rotation_keeps_the_previous(tmp_path):
    ck.save_checkpoint(tmp_path, _state(1))
    assert not (tmp_path / ck.PREV).exists()
    ck.save_checkpoint(tmp_path, _state(2))
    state, path = ck.load_latest(tmp_path)
    assert path.name == ck.LAST and state["tag"] == 2
    assert torch.equal(state["weights"], _state(2)["weights"])
    assert ck.read_checkpoint(tmp_path / ck.PREV)["tag"] == 1
    ck.save_checkpoint(tmp_path, _state(3))
    assert ck.read_checkpoint(tmp_path / ck.PREV)["tag"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.LAST, ck.PREV]  # no temp files


def test_no_checkpoint_is_none(tmp_path):
    assert ck.load_latest(tmp_path) is None
    assert not ck.has_checkpoint(tmp_path)


@pytest.mark.parametrize("keep", [0, 5, 30, 200])
def test_truncated_newest_falls_back_to_previous(tmp_path, keep):
    ck.save_checkpoint(tmp_path, _state(1))
    ck.save_checkpoint(tmp_path, _state(2))
    last = tmp_path / ck.LAST
    last.write_bytes(last.read_bytes()[:keep])
    warnings: list[str] = []
    state, path = ck.load_latest(tmp_path, warn=warnings.append)
    assert state["tag"] == 1 and path.name == ck.PREV
    assert len(warnings) == 1 and str(last) in warnings[0]
    assert "truncated" in warnings[0] or "not a gaf checkpoint" in warnings[0]


def test_flipped_byte_is_caught_by_the_checksum(tmp_path):
    path = ck.save_checkpoint(tmp_path, _state(1))
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match="checksum"):
        ck.read_checkpoint(path)


def test_every_checkpoint_damaged_names_each_file(tmp_path):
    ck.save_checkpoint(tmp_path, _state(1))
    ck.save_checkpoint(tmp_path, _state(2))
    last = tmp_path / ck.LAST
    last.write_bytes(last.read_bytes()[:100])
    (tmp_path / ck.PREV).write_bytes(b"not a checkpoint at all, just text")
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_latest(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / ck.LAST) in msg and str(tmp_path / ck.PREV) in msg
    assert "truncated" in msg and "not a gaf checkpoint" in msg


def test_interrupted_write_leaves_the_old_checkpoints(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, _state(1))
    ck.save_checkpoint(tmp_path, _state(2))

    def killed(fd):
        raise KeyboardInterrupt  # as if the process died while the data went to disk

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, _state(3))
    monkeypatch.undo()
    assert ck.read_checkpoint(tmp_path / ck.LAST)["tag"] == 2
    assert ck.read_checkpoint(tmp_path / ck.PREV)["tag"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.LAST, ck.PREV]


def test_kill_between_the_two_renames_leaves_the_previous(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, _state(1))
    ck.save_checkpoint(tmp_path, _state(2))
    real_replace = os.replace
    calls = []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, _state(3))
    monkeypatch.undo()
    state, path = ck.load_latest(tmp_path)
    assert state["tag"] == 2 and path.name == ck.PREV


def test_write_atomic_replaces_whole_files(tmp_path):
    target = tmp_path / "sub" / "result.json"
    ck.write_atomic(target, b"one")
    ck.write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]


def test_config_mismatch_names_fields_and_allows_neutral_ones():
    a = TrainConfig().to_dict()
    b = TrainConfig(threads=3, progress=False, name="x", data_dir="/elsewhere").to_dict()
    assert ck.config_differences(a, b) == []
    ck.check_config(a, b, "ckpt-last.pt")
    c = TrainConfig(lr=0.1, seed=4).to_dict()
    diffs = ck.config_differences(a, c)
    assert [d.split(":")[0] for d in diffs] == ["lr", "seed"]
    with pytest.raises(ck.CheckpointMismatchError) as err:
        ck.check_config(a, c, "runs/x/ckpt-last.pt")
    msg = str(err.value)
    assert "lr: 0.05 in the checkpoint, 0.1 now" in msg and "seed: 0" in msg
    assert "runs/x/ckpt-last.pt" in msg and "threads" in msg  # says what may differ


def test_config_field_missing_on_one_side_is_a_difference():
    a = TrainConfig().to_dict()
    b = dict(a, amp="bf16")
    a.pop("amp", None)
    assert ck.config_differences(a, b) == ["amp: '<not set>' in the checkpoint, 'bf16' now"]


def _draw(gens, nps):
    return (torch.rand(3).tolist(), random.random(),
            [torch.rand(2, generator=g).tolist() for g in gens.values()],
            [g.random(2).tolist() for g in nps.values()])


def test_rng_round_trip_through_a_file(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    gens = {"order": torch.Generator().manual_seed(3), "augment": torch.Generator().manual_seed(4)}
    nps = {"control": np.random.default_rng(5)}
    _draw(gens, nps)  # move every stream away from its seed
    ck.save_checkpoint(tmp_path, {"rng": ck.capture_rng(gens, nps)})
    expected = _draw(gens, nps)
    _draw(gens, nps)
    state, _ = ck.load_latest(tmp_path)
    ck.restore_rng(state["rng"], gens, nps)
    assert _draw(gens, nps) == expected


def test_restore_refuses_a_missing_stream():
    state = ck.capture_rng({"order": torch.Generator()})
    with pytest.raises(ck.CheckpointError, match="augment"):
        ck.restore_rng(state, {"order": torch.Generator(), "augment": torch.Generator()})
