"""Checkpoints of a training run: written atomically, verified on load, kept two deep.

A run's directory holds at most two checkpoints, ``ckpt-last.pt`` (newest) and
``ckpt-prev.pt`` (the one before). Saving:

1. serialise the state with ``torch.save`` into memory;
2. write ``MAGIC | payload length | sha256(payload) | payload`` to a temporary file in the
   same directory (a rename is only atomic within one file system), flush and ``fsync``;
3. rename ``ckpt-last.pt`` to ``ckpt-prev.pt``, then the temporary file to
   ``ckpt-last.pt`` (``os.replace``), and ``fsync`` the directory so the renames persist.

A kill at any point leaves at least one complete checkpoint: before step 3 the old pair is
untouched; between the two renames only ``ckpt-prev.pt`` exists, and it is the newest
complete one. Loading checks the magic, the length and the checksum, so a truncated or
damaged file is detected (never half-loaded); :func:`load_latest` then falls back to the
previous checkpoint and says so, or raises :class:`CheckpointError` naming each file and
what is wrong with it.

A checkpoint records the configuration of its run. :func:`check_config` refuses to resume
from a checkpoint of another configuration and names the differing fields; fields that do
not change what a run computes (:data:`RESULT_NEUTRAL_FIELDS`: progress output, CPU
threads, the run's display name, where the data files are found, how often to checkpoint)
may differ.

RNG streams: :func:`capture_rng` and :func:`restore_rng` cover torch's global CPU and CUDA
generators, Python's ``random``, and any named ``torch.Generator`` and
``numpy.random.Generator`` the loop owns (data order, augmentation, random controls).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

LAST = "ckpt-last.pt"
PREV = "ckpt-prev.pt"
MAGIC = b"GAFCKPT1"
_HEADER = len(MAGIC) + 8 + 32  # magic, payload length (little-endian u64), sha256

# Configuration fields that do not change what a run computes: a resumed run may set them
# differently (e.g. more threads on a bigger machine, data moved to another directory).
RESULT_NEUTRAL_FIELDS: frozenset[str] = frozenset(
    {"progress", "threads", "name", "data_dir", "download", "checkpoint_every"}
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (truncated, damaged, not a checkpoint)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint written by a run of another configuration."""


# --------------------------------------------------------------------------------------
# Files


def _durable_temp(directory: Path, name: str, data: bytes) -> str:
    """``data`` in a new temporary file of ``directory``, flushed to disk; its path."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a
    part: temporary file in the same directory, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _durable_temp(path.parent, path.name, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible (nor needed) on Windows.
    if sys.platform.startswith("win"):
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode(state: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    payload = buf.getvalue()
    return MAGIC + len(payload).to_bytes(8, "little") + hashlib.sha256(payload).digest() + payload


def decode(data: bytes, name: str = "checkpoint") -> dict[str, Any]:
    """The state stored by :func:`encode`; CheckpointError naming ``name`` and the fault."""
    if len(data) < _HEADER or not data.startswith(MAGIC):
        if len(data) < len(MAGIC) and MAGIC.startswith(data):
            raise CheckpointError(f"{name} is truncated ({len(data)} bytes)")
        raise CheckpointError(f"{name} is not a gaf checkpoint (no {MAGIC!r} header)")
    length = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 8], "little")
    digest = data[len(MAGIC) + 8 : _HEADER]
    payload = data[_HEADER:]
    if len(payload) != length:
        raise CheckpointError(
            f"{name} is truncated: {len(payload)} of {length} payload bytes"
            if len(payload) < length else f"{name} has {len(payload) - length} trailing bytes"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{name} is damaged: its checksum does not match")
    # weights_only: tensors, numbers, strings and containers only; nothing is executed.
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def save_checkpoint(directory: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write ``state`` as the newest checkpoint of ``directory``, keeping the previous one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = encode(state)  # serialise first: a failure here leaves both files alone
    last, prev = directory / LAST, directory / PREV
    tmp = _durable_temp(directory, LAST, data)
    try:
        if last.exists():
            os.replace(last, prev)
        os.replace(tmp, last)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    return last


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    try:
        return decode(data, f"checkpoint {path}")
    except CheckpointError:
        raise
    except Exception as e:  # a payload that passed the checksum yet does not unpickle
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {e}") from None


def has_checkpoint(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    return (d / LAST).exists() or (d / PREV).exists()


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_latest(directory: str | os.PathLike, warn: Callable[[str], None] = _warn
                ) -> tuple[dict[str, Any], Path] | None:
    """The newest usable checkpoint of ``directory`` and its path, or None if there is none.

    A damaged newest checkpoint is reported through ``warn`` and the previous one used; if
    every checkpoint present is damaged, CheckpointError names each file and its fault.
    """
    directory = Path(directory)
    faults = []
    for name in (LAST, PREV):
        path = directory / name
        if not path.exists():
            continue
        try:
            state = read_checkpoint(path)
        except CheckpointError as e:
            faults.append(str(e))
            continue
        if faults:
            warn(f"{faults[0]}; resuming from the previous checkpoint {path}")
        return state, path
    if faults:
        raise CheckpointError(f"no usable checkpoint in {directory}: " + "; ".join(faults))
    return None


# --------------------------------------------------------------------------------------
# Configuration


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Fields (outside RESULT_NEUTRAL_FIELDS) whose values differ, as ``name: saved -> now``."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in RESULT_NEUTRAL_FIELDS:
            continue
        missing = "<not set>"
        a, b = saved.get(key, missing), current.get(key, missing)
        if not _same(a, b):
            out.append(f"{key}: {a!r} in the checkpoint, {b!r} now")
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # NaN equals NaN here
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def check_config(saved: Mapping[str, Any], current: Mapping[str, Any], path: str | os.PathLike
                 ) -> None:
    """CheckpointMismatchError naming the differing fields unless the two configurations
    compute the same run."""
    diffs = config_differences(saved, current)
    if diffs:
        raise CheckpointMismatchError(
            f"{path} belongs to a run of another configuration ({'; '.join(diffs)}); "
            f"resume with the same settings or use another --out directory (these may "
            f"differ: {', '.join(sorted(RESULT_NEUTRAL_FIELDS))})"
        )


# --------------------------------------------------------------------------------------
# Random number generators


def capture_rng(
    generators: Mapping[str, torch.Generator] | None = None,
    numpy_generators: Mapping[str, np.random.Generator] | None = None,
) -> dict[str, Any]:
    """Every RNG stream a run may draw from, as tensors and plain Python values."""
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
        "numpy": {k: g.bit_generator.state for k, g in (numpy_generators or {}).items()},
    }
    # Only once CUDA is in use: querying it would initialise a context on every GPU.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(
    state: Mapping[str, Any],
    generators: Mapping[str, torch.Generator] | None = None,
    numpy_generators: Mapping[str, np.random.Generator] | None = None,
) -> None:
    """Put every stream back as :func:`capture_rng` found it; CheckpointError if the
    checkpoint lacks a stream the run has."""
    torch.set_rng_state(state["torch_cpu"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda_states = state["torch_cuda"]
        # On another number of GPUs the global CUDA streams cannot be matched one to one;
        # the loop's own streams (order, augmentation) are CPU generators and still are.
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    for kind, live in (("generators", generators), ("numpy", numpy_generators)):
        saved = state.get(kind, {})
        missing = sorted(set(live or {}) - set(saved))
        if missing:
            raise CheckpointError(f"the checkpoint has no state for RNG stream(s) {missing}")
        for key, gen in (live or {}).items():
            if kind == "generators":
                gen.set_state(saved[key])
            else:
                gen.bit_generator.state = saved[key]
