"""Map a model's parameter gradients to and from flat rows.

A micro-gradient is the concatenation of every trainable parameter's ``.grad``, in the
order given; frozen parameters are left out, a ``.grad`` of ``None`` contributes zeros.
:meth:`FlatGradients.bind` points each ``.grad`` at a view of a flat buffer, so backward
accumulates straight into it (as DDP's ``gradient_as_bucket_view``) and
:meth:`FlatGradients.gather` copies only the gradients that were replaced.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def flat_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """One dtype for the flat buffer: the parameters' dtype if they share one, else float32
    (or float64 if any parameter is float64)."""
    kinds = set(dtypes)
    if len(kinds) == 1:
        return kinds.pop()
    return torch.float64 if torch.float64 in kinds else torch.float32


class FlatGradients:
    """Flat view of the gradients of ``params`` (trainable ones only).

    Raises ``ValueError`` if no parameter is trainable, if parameters live on different
    devices, or (at :meth:`gather`) if a parameter's shape changed since construction.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict]):
        params = list(params)
        if params and isinstance(params[0], dict):  # optimizer-style parameter groups
            params = [p for group in params for p in group["params"]]
        seen: set[int] = set()
        self.params: list[Tensor] = []
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"expected parameters (tensors), got {type(p).__name__}")
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        if not self.params:
            raise ValueError("no trainable parameters: every parameter has requires_grad=False")
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(
                f"parameters live on several devices {sorted(map(str, devices))}; "
                "gaf filters one flat gradient per device"
            )
        self.device = devices.pop()
        self.dtype = flat_dtype(p.dtype for p in self.params)
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.numel = sum(self.numels)
        self._bound: list[Tensor | None] = [None] * len(self.params)
        self._views: dict[tuple, list[Tensor]] = {}
        # The zeroed buffer bind() pointed .grad at and its version counter then: while
        # both are unchanged and every .grad is still its view, no backward has run since.
        self._fresh: tuple[Tensor, int] | None = None

    def new_buffer(self, *leading: int) -> Tensor:
        return torch.zeros(*leading, self.numel, dtype=self.dtype, device=self.device)

    def check_shapes(self) -> None:
        for i, (p, shape) in enumerate(zip(self.params, self.shapes, strict=True)):
            if p.shape != shape:
                raise ValueError(
                    f"parameter {i} changed shape from {tuple(shape)} to {tuple(p.shape)} "
                    "between micro-batches; build a new collector for the new model"
                )
            if p.grad is not None and p.grad.shape != shape:
                raise ValueError(
                    f"parameter {i} has a .grad of shape {tuple(p.grad.shape)}, expected "
                    f"{tuple(shape)}"
                )

    def views(self, flat: Tensor, cache: bool = False) -> list[Tensor]:
        """Per-parameter views into a flat [P] tensor. With ``cache``, views of a long-lived
        buffer are made once (~6 µs per parameter otherwise, twice per micro-batch), keyed by
        address; the cached views keep the storage alive. Cache only buffers the caller keeps."""
        key = (flat.data_ptr(), flat.numel(), flat.dtype, flat.device)
        views = self._views.get(key)
        if views is None and not cache:
            pieces = flat.split(self.numels)
            return [v.view(shape) for v, shape in zip(pieces, self.shapes, strict=True)]
        if views is None:
            if len(self._views) >= 64:
                self._views.clear()
            pieces = flat.split(self.numels)
            views = [v.view(shape) for v, shape in zip(pieces, self.shapes, strict=True)]
            self._views[key] = views
        return views

    def forget_views(self) -> None:
        """Drop cached views (call when a buffer they point into is discarded)."""
        self._views.clear()

    def gather(self, out: Tensor) -> Tensor:
        """Copy the current ``.grad`` of every parameter into ``out`` [P] (None → zeros).

        Parameters bound to views of ``out`` are skipped: their gradient is already there.
        """
        self.check_shapes()
        for p, view, bound in zip(self.params, self.views(out, cache=True), self._bound,
                                  strict=True):
            g = p.grad
            if g is not None and g is bound and g.data_ptr() == view.data_ptr():
                continue
            if g is None:
                view.zero_()
            else:
                if g.is_sparse:
                    g = g.to_dense()
                view.copy_(g)
        return out

    def bind(self, flat: Tensor) -> None:
        """Make every ``param.grad`` a view of ``flat`` [P], so backward accumulates into it.

        Only possible where a parameter's dtype equals the buffer's; others get a copy on
        :meth:`gather` instead.
        """
        self._point(flat, cache=True, copy=False)
        self._fresh = (flat, flat._version)

    def untouched(self) -> bool:
        """Whether nothing wrote a gradient since the last :meth:`bind`: every ``.grad`` is
        still its bound view (or None) and the buffer was not modified in place. A backward
        either adds into the views (the version counter moves) or replaces ``.grad``."""
        if self._fresh is None:
            return False
        flat, version = self._fresh
        if flat._version != version:
            return False
        return all(p.grad is bound for p, bound in zip(self.params, self._bound, strict=True))

    def write(self, flat: Tensor, cache: bool = False) -> None:
        """Set every ``param.grad`` to the matching slice of ``flat`` (bound as views).

        ``cache``: ``flat`` is a long-lived buffer whose views may be kept (see :meth:`views`).
        """
        self._fresh = None
        self._point(flat, cache=cache, copy=True)

    def _point(self, flat: Tensor, cache: bool, copy: bool) -> None:
        """``.grad`` ← its view of ``flat``; a parameter of another dtype gets a converted
        copy (``copy``) or None."""
        views = self.views(flat, cache=cache)
        for i, (p, view) in enumerate(zip(self.params, views, strict=True)):
            same = p.dtype == flat.dtype
            p.grad = view if same else (view.to(p.dtype).clone() if copy else None)
            self._bound[i] = view if same else None

    def clear(self) -> None:
        """Drop every ``param.grad`` (set to None): no stale gradient survives a skip."""
        self._fresh = None
        for i, p in enumerate(self.params):
            p.grad = None
            self._bound[i] = None


# -- buffers kept between steps -------------------------------------------------------------
# A fresh P-sized allocation every step costs page faults on the CPU and allocator work
# elsewhere; DDP keeps its buckets for the same reason.


class OutputBuffer:
    """The [P] buffer a step's direction is written to, reused across steps."""

    def __init__(self, flat: FlatGradients):
        self.flat = flat
        self.tensor: Tensor | None = None

    def get(self) -> Tensor:
        if self.tensor is None:
            self.tensor = self.flat.new_buffer()
        return self.tensor

    def swap(self, other: Tensor) -> Tensor:
        """Make ``other`` the output and return the previous one (allocated if needed):
        the streaming sum becomes the result in place, the old result the next sum."""
        previous = self.get()
        self.tensor = other
        return previous


class RowBuffer:
    """Rows [capacity, P] for a step's micro-gradients; row k + 1 is bound to ``.grad``
    while row k is taken, so M micro-batches need M + 1 rows. Grows by doubling."""

    def __init__(self, flat: FlatGradients, expected_rows: int | None):
        self.flat = flat
        self.expected = expected_rows
        self.rows: Tensor | None = None

    def ensure(self, needed: int, filled: int) -> Tensor:
        """At least ``needed`` rows, keeping the first ``filled``."""
        if self.rows is not None and needed <= self.rows.shape[0]:
            return self.rows
        first = (self.expected or 3) + 1
        capacity = max(needed, first if self.rows is None else 2 * self.rows.shape[0])
        rows = self.flat.new_buffer(capacity)
        self.flat.forget_views()  # cached views would keep the old buffer alive
        if self.rows is not None:
            rows[:filled].copy_(self.rows[:filled])
            # .grad may be bound to the old buffer's row k: gather() copies it over.
        self.rows = rows
        return rows
