"""Resumable experiment runs: what a checkpoint of the loop holds, and putting it back.

A checkpoint is taken at a step boundary: at the end of every epoch (after its evaluation
and history row) and, with ``checkpoint_every = N``, after every N-th step inside an epoch.
It holds (files and their safety: :mod:`gaflab.checkpoint`)

    config      the run's TrainConfig; resuming under another configuration is refused
                with the differing fields named
    model       the (uncompiled) module's state_dict, BatchNorm statistics included
    optimizer   its state_dict (momentum buffers, learning rates, ``initial_lr``)
    trainer     ``GAFTrainer.state_dict()``: collector statistics, an adaptive threshold's
                state, a blind control's RNG, the GradScaler
    loop        LoopState: epochs and steps done, timings, early stopping's best weights,
                and the data order and augmentation generators
    rng         the global streams: torch CPU (and CUDA), Python's ``random``
    result      the RunResult so far: history, distance trace, warnings, counters
    epoch       mid-epoch only: the epoch's micro-batch indices, the next step, the
                EpochLog so far and small-loss's kept-sample masks

The next step depends on nothing else, so a resumed run does the uninterrupted run's
arithmetic: the same history (wall-clock fields aside) and the same final parameters,
bit for bit on the same machine and thread count (another number of CPU threads may
change the last bits of a float reduction).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gaflab import checkpoint as ck
from gaflab.results import RunResult, strict_json
from gaflab.selection import EpochLog

FORMAT = "gaf-run/1"
RESULT_FILE = "result.json"  # a finished run, beside its checkpoints


@dataclass
class PartialEpoch:
    """An epoch interrupted at a step boundary, as ``run_epoch`` continues it."""

    batches: Tensor  # [steps, M, b] indices (CPU)
    next_step: int
    log: EpochLog
    kept: list[Tensor] | None  # small-loss's kept-sample masks so far
    seconds: float  # training time already spent in this epoch


def _log_state(log: EpochLog) -> dict[str, Any]:
    # numpy arrays become tensors: checkpoints load with torch.load(weights_only=True).
    return {
        "num_micro_batches": log.num_micro_batches,
        "loss_sum": log.loss_sum.detach().cpu(),
        "accepted": [torch.from_numpy(np.asarray(a)) for a in log.accepted],
        "distances": [torch.from_numpy(np.asarray(d)) for d in log.distances],
        "anchors": list(log.anchors),
        "skipped": list(log.skipped),
        "step_distance": [float(d) for d in log.step_distance],
        "grams": [g.detach().cpu() for g in log.grams],
    }


def _log_from_state(state: dict[str, Any], device: torch.device) -> EpochLog:
    return EpochLog(
        state["num_micro_batches"], state["loss_sum"].to(device),
        accepted=[a.numpy() for a in state["accepted"]],
        distances=[d.numpy() for d in state["distances"]],
        anchors=list(state["anchors"]), skipped=list(state["skipped"]),
        step_distance=list(state["step_distance"]),
        grams=[g.to(device) for g in state.get("grams", [])],
    )


def _loop_state(state) -> dict[str, Any]:
    out = {}
    for f in fields(state):
        value = getattr(state, f.name)
        out[f.name] = value.get_state() if isinstance(value, torch.Generator) else value
    return out


def _restore_loop(state, saved: dict[str, Any]) -> None:
    for f in fields(state):
        if f.name not in saved:
            raise ck.CheckpointError(f"the checkpoint has no loop field {f.name!r}")
        value = getattr(state, f.name)
        if isinstance(value, torch.Generator):
            value.set_state(saved[f.name])
        else:
            setattr(state, f.name, saved[f.name])


def _result_state(result: RunResult) -> dict[str, Any]:
    return {f.name: getattr(result, f.name) for f in fields(result) if f.name != "model"}


class RunCheckpoints:
    """Checkpoints of one run in ``directory``, bound to the run's live objects.

    ``train`` builds the run (model, optimizer, method, loop state, result), binds them,
    then either :meth:`restore`\\ s them from the newest usable checkpoint or
    :meth:`clear`\\ s the directory of an earlier run's files; it calls :meth:`save` at
    every epoch's end and :meth:`step_done` after every step.
    """

    def __init__(self, directory: str | os.PathLike, config: dict[str, Any],
                 every: int | None = None):
        self.directory = Path(directory)
        self.config = dict(config)
        self.every = every
        self._bound: tuple | None = None
        self.saves = 0
        self.save_seconds = 0.0
        self.restored_from: Path | None = None

    def bind(self, model: nn.Module, optimizer: torch.optim.Optimizer, method, state,
             result: RunResult) -> RunCheckpoints:
        self._bound = (model, optimizer, method, state, result)
        return self

    def clear(self) -> None:
        """Remove an earlier run's checkpoints and finished result (a fresh start)."""
        for name in (ck.LAST, ck.PREV, RESULT_FILE):
            (self.directory / name).unlink(missing_ok=True)

    def save(self, partial: PartialEpoch | None = None) -> Path:
        model, optimizer, method, state, result = self._bound
        t0 = time.perf_counter()
        payload: dict[str, Any] = {
            "format": FORMAT,
            "config": self.config,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "trainer": method.trainer.state_dict(),
            "loop": _loop_state(state),
            "rng": ck.capture_rng(),
            "result": _result_state(result),
            "epoch": None if partial is None else {
                "batches": partial.batches.cpu(),
                "next_step": partial.next_step,
                "log": _log_state(partial.log),
                "kept": None if partial.kept is None else [k.cpu() for k in partial.kept],
                "seconds": partial.seconds,
            },
        }
        path = ck.save_checkpoint(self.directory, payload)
        self.saves += 1
        self.save_seconds += time.perf_counter() - t0
        return path

    def step_done(self, step: int, batches: Tensor, next_step: int, log: EpochLog,
                  kept: list[Tensor] | None, seconds: float) -> None:
        """After global step ``step``: a mid-epoch checkpoint when one is due (the epoch's
        last step is left to the end-of-epoch checkpoint)."""
        if self.every and step % self.every == 0 and next_step < batches.shape[0]:
            self.save(PartialEpoch(batches, next_step, log, kept, seconds))

    def restore(self) -> PartialEpoch | None | bool:
        """Load the newest usable checkpoint into the bound objects. Returns False when
        there is none (start from scratch), else the interrupted epoch (or None when the
        checkpoint sits at an epoch's end)."""
        found = ck.load_latest(self.directory)
        if found is None:
            return False
        saved, path = found
        self.restored_from = path
        if saved.get("format") != FORMAT:
            raise ck.CheckpointError(f"checkpoint {path} is not a gaf run checkpoint "
                                     f"(format {saved.get('format')!r}, expected {FORMAT!r})")
        ck.check_config(saved["config"], self.config, path)
        model, optimizer, method, state, result = self._bound
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        method.trainer.load_state_dict(saved["trainer"])
        _restore_loop(state, saved["loop"])
        ck.restore_rng(saved["rng"])
        for name, value in saved["result"].items():
            setattr(result, name, value)
        result.config = dict(self.config)  # neutral fields as given now
        epoch = saved["epoch"]
        if epoch is None:
            return None
        device = next(model.parameters()).device
        kept = None if epoch["kept"] is None else [k.to(device) for k in epoch["kept"]]
        return PartialEpoch(epoch["batches"], epoch["next_step"],
                            _log_from_state(epoch["log"], device), kept, epoch["seconds"])


def write_finished(directory: str | os.PathLike, result: RunResult) -> Path:
    """Record a finished run (what ``gaf compare --resume`` skips), atomically."""
    text = strict_json(result.to_dict())  # NaN as null: from_dict reads it back as NaN
    return ck.write_atomic(Path(directory) / RESULT_FILE, text.encode())


def load_finished(directory: str | os.PathLike, config: dict[str, Any]) -> RunResult | None:
    """The finished run recorded in ``directory``, or None; CheckpointMismatchError if it
    was run under another configuration."""
    path = Path(directory) / RESULT_FILE
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ck.CheckpointError(f"cannot read the finished run {path}: {e}") from None
    ck.check_config(doc["config"], config, path)
    result = RunResult.from_dict(doc)
    result.config = dict(config)
    return result


def run_directory_name(label: str, seed: int) -> str:
    """A file-system friendly directory name for a run: its label and seed."""
    safe = "".join(c if c.isalnum() or c in "-_.=" else "-" for c in label)
    while "--" in safe:
        safe = safe.replace("--", "-")
    return f"{safe.strip('-')}-seed{seed}"


def saved_config(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The configuration a run directory was written under (its result.json, else its
    newest checkpoint), or None when it holds neither."""
    directory = Path(directory)
    path = directory / RESULT_FILE
    if path.exists():
        try:
            return json.loads(path.read_text())["config"]
        except (OSError, ValueError, KeyError) as e:
            raise ck.CheckpointError(f"cannot read the finished run {path}: {e}") from None
    found = ck.load_latest(directory)
    return None if found is None else found[0].get("config")


def check_resume(configs: list[dict[str, Any]], dirs: list[Path], root: Path) -> list[int]:
    """Before a resumed grid starts anything: the indices of its runs that have nothing to
    resume (they start afresh), or an error when resuming cannot be what was meant.

    * nothing checkpointed under ``root`` at all: CheckpointError (no checkpoint);
    * some runs of the grid without a checkpoint while checkpointed runs under ``root``
      are not in the grid: the settings changed (another --tau, --seed, --method, ... gives
      other run directories), so CheckpointMismatchError names the differing fields rather
      than starting fresh runs that would overwrite results.json.
    Runs without a checkpoint otherwise (a grid stopped before reaching them, or a grid
    extended by new runs) start afresh.
    """
    root = Path(root)
    saved = sorted(d for d in (root.iterdir() if root.is_dir() else ())
                   if d.is_dir() and (ck.has_checkpoint(d) or (d / RESULT_FILE).exists()))
    if not saved:
        raise ck.CheckpointError(
            f"--resume: no checkpoint in {root}: nothing to resume. Check --out, or run "
            "without --resume to start afresh")
    wanted = {Path(d) for d in dirs}
    orphans = [d for d in saved if d not in wanted]
    missing = [i for i, d in enumerate(dirs) if d not in set(saved)]
    if orphans and missing:
        best = None
        for d in orphans:
            old = saved_config(d)
            if old is None:
                continue
            for i in missing:
                diffs = ck.config_differences(old, configs[i])
                if best is None or len(diffs) < len(best[0]):
                    best = (diffs, d)
        detail = f" ({'; '.join(best[0])}; compared with {best[1]})" if best else ""
        raise ck.CheckpointMismatchError(
            f"--resume: {len(missing)} run(s) of this command have no checkpoint in {root}, "
            f"and {len(orphans)} checkpointed run(s) there are not part of it: the settings "
            f"differ from the interrupted command's{detail}. Resume with the same settings, "
            "or use another --out to start these runs afresh")
    return missing
