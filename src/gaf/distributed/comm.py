"""The communicator GAF's collectives go through, its errors, and reusable buffers.

Every collective error (a peer died, the group timed out) is re-raised as
:class:`GAFDistributedError` naming the rank, the collective and the elapsed time; the
bound is the group's timeout or, if given, ``timeout=`` (``Work.wait(timeout)``).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
all_gather_flat: Callable = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class GAFDistributedError(RuntimeError):
    """A distributed GAF step failed: ranks disagree, a peer died, or a collective timed out."""


class AllToAllUnsupported(Exception):
    """The backend refused all_to_all (before any data moved)."""


def _as_timedelta(timeout: float | datetime.timedelta | None) -> datetime.timedelta | None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


def _looks_unsupported(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, NotImplementedError) or (
        ("all_to_all" in text or "alltoall" in text)
        and ("support" in text or "implement" in text)
    )


class Comm:
    """The group, its size and this rank, and a way to run collectives that fail clearly."""

    def __init__(self, group=None, timeout: float | datetime.timedelta | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise GAFDistributedError(
                "torch.distributed is not initialised: call "
                "torch.distributed.init_process_group(...) first (torchrun sets the "
                "environment it needs), or use gaf.filter_gradients on one process"
            )
        self.group = group
        self.timeout = _as_timedelta(timeout)
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        if self.rank < 0:
            raise GAFDistributedError("this process is not a member of the given group")
        self.backend = str(dist.get_backend(group))

    def global_rank(self, group_rank: int) -> int:
        """Global rank of a rank of this group (broadcast's ``src`` is a global rank)."""
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def start(self, what: str, op: Callable, *args, unsupported_ok: bool = False, **kwargs):
        """Issue a collective asynchronously; returns its Work (or None)."""
        try:
            return op(*args, group=self.group, async_op=True, **kwargs)
        except Exception as exc:
            raise self._failure(what, exc, time.monotonic(), unsupported_ok) from exc

    def wait(self, what: str, works: Sequence, since: float, unsupported_ok: bool = False) -> None:
        """Wait for issued collectives, each within ``timeout`` if one was given."""
        for work in works:
            if work is None:
                continue
            try:
                if self.timeout is None:
                    work.wait()
                elif work.wait(timeout=self.timeout) is False:
                    raise TimeoutError(f"not complete after {self.timeout.total_seconds()} s")
            except Exception as exc:
                raise self._failure(what, exc, since, unsupported_ok) from exc

    def run(self, what: str, op: Callable, *args, unsupported_ok: bool = False, **kwargs) -> None:
        since = time.monotonic()
        work = self.start(what, op, *args, unsupported_ok=unsupported_ok, **kwargs)
        self.wait(what, [work], since, unsupported_ok)

    def _failure(self, what: str, exc: BaseException, since: float, unsupported_ok: bool):
        if isinstance(exc, (GAFDistributedError, AllToAllUnsupported)):
            return exc
        if unsupported_ok and _looks_unsupported(exc):
            return AllToAllUnsupported(str(exc))
        elapsed = time.monotonic() - since
        cause = f"{type(exc).__name__}: {exc}"
        head = f"GAF rank {self.rank}/{self.size}: {what}"
        kind = failure_kind(exc)
        if kind == "timeout":
            limit = (
                f"timeout={self.timeout.total_seconds():g} s"
                if self.timeout is not None
                else "the process group's timeout"
            )
            return GAFDistributedError(
                f"{head} timed out after {elapsed:.1f} s ({limit}): {cause}. Another rank "
                "probably hangs or stopped taking part in the GAF step; every rank must call "
                "it the same number of times."
            )
        if kind == "peer":
            return GAFDistributedError(
                f"{head} failed after {elapsed:.1f} s: the connection to another rank was "
                "reset or closed, so that rank probably died or exited (no timeout expired). "
                f"Look for the first error in the other ranks' logs. {cause}"
            )
        return GAFDistributedError(
            f"{head} failed after {elapsed:.1f} s: {cause}. Another rank probably died, "
            "raised, or stopped taking part in the GAF step; every rank must call it "
            "the same number of times."
        )


# Words the backends use (gloo's tcp transport, NCCL's watchdog, the TCP store) for a
# collective that ran out of time, and for one whose peer went away.
_TIMEOUT_WORDS = ("timed out", "timeout", "timing out", "deadline")
_PEER_WORDS = ("connection reset", "connection closed", "broken pipe", "connection refused",
               "closed by peer", "remote process exited", "socket closed", "end of file")


def failure_kind(exc: BaseException) -> str:
    """"timeout", "peer" (a connection to another rank went away) or "other"."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    text = str(exc).lower()
    if any(word in text for word in _TIMEOUT_WORDS):
        return "timeout"
    if isinstance(exc, (ConnectionError, BrokenPipeError)) or any(
            word in text for word in _PEER_WORDS):
        return "peer"
    return "other"


class Workspace:
    """Buffers kept between exchanges, so that repeated steps allocate nothing (fresh
    large allocations cost page faults). Holds up to about N·m·P elements for
    ``method="allgather"``, m·P (m > 1: 2·m·P) for "sharded"."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:numel]
