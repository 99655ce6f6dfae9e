"""Seeded fault injection: what a broken rank, a bad shard or a stale worker does to the
micro-gradients a step averages (docs/faults-and-robust-rules.md).

A :class:`FaultInjector` corrupts f chosen rows (micro-batches, or ranks' rows in
rank-major order) by ``"sign-flip"`` (g ← -g), ``"scale"`` (g ← scale · g, default -10),
``"noise"`` (g ← Gaussian n with |n| = noise_norm · |g|, default 100), ``"nonfinite"``
(every entry ← value, default NaN), ``"stale"`` (the row's uncorrupted gradient of the
previous step; the first step passes unchanged) or ``"wrong-labels"`` (the micro-batch's
labels all replaced by another class, before the forward). Entry points, each a no-op
for kinds it does not handle: :meth:`~FaultInjector.corrupt_rows` ([M, P] rows),
:meth:`~FaultInjector.gradient_hook` (``on_micro_gradient`` of ``GAFTrainer.step``) and
:meth:`~FaultInjector.corrupt_labels`. Distributed, each rank passes ``first_row = rank ·
m``; randomness is seeded by (seed, step, row) on the CPU, so a row is corrupted
identically whatever the device, the process or the order of visits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

GRADIENT_FAULTS: tuple[str, ...] = ("sign-flip", "scale", "noise", "nonfinite", "stale")
DATA_FAULTS: tuple[str, ...] = ("wrong-labels",)
FAULT_KINDS: tuple[str, ...] = GRADIENT_FAULTS + DATA_FAULTS


@dataclass(frozen=True)
class FaultSpec:
    """Which rows go wrong, how, and the seed: everything a run records to be repeated."""

    kind: str
    rows: tuple[int, ...]
    scale: float = -10.0
    noise_norm: float = 100.0
    value: float = float("nan")
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; choose one of "
                             f"{', '.join(FAULT_KINDS)}")
        rows = tuple(self.rows)
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in rows):
            raise ValueError(f"faulty rows must be non-negative ints, got {rows!r}")
        if len(set(rows)) != len(rows):
            raise ValueError(f"faulty rows repeat: {rows!r}")
        object.__setattr__(self, "rows", rows)
        if not math.isfinite(self.scale):
            raise ValueError(f"scale must be finite, got {self.scale}")
        if not (math.isfinite(self.noise_norm) and self.noise_norm > 0):
            raise ValueError(f"noise_norm must be a finite positive number, got "
                             f"{self.noise_norm}")
        if self.kind == "nonfinite" and math.isfinite(self.value):
            raise ValueError(f"a nonfinite fault writes inf or NaN, got value {self.value}")

    def to_dict(self) -> dict:
        """JSON-ready (NaN/inf as text), for results.json."""
        out = asdict(self)
        out["rows"] = list(self.rows)
        out["value"] = repr(self.value)
        return out


def _generator(seed: int, step: int, row: int) -> torch.Generator:
    # One stream per (seed, step, row): independent of visiting order, rank and device.
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_003 + row)


def _norm(pieces: Sequence[Tensor]) -> float:
    return math.sqrt(sum(float(p.double().pow(2).sum()) for p in pieces))


@dataclass
class FaultInjector:
    """Applies a :class:`FaultSpec` step after step. ``injected`` counts the corrupted rows;
    ``step`` advances at :meth:`end_step`, which :meth:`corrupt_rows` and the hook call."""

    spec: FaultSpec
    step: int = 0
    injected: int = 0
    _stale: dict[int, list[Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def make(cls, kind: str, rows: Iterable[int], **options) -> FaultInjector:
        return cls(FaultSpec(kind, tuple(rows), **options))

    @property
    def kind(self) -> str:
        return self.spec.kind

    def is_faulty(self, row: int) -> bool:
        return row in self.spec.rows

    def end_step(self) -> None:
        self.step += 1

    def corrupt(self, row: int, pieces: Sequence[Tensor]) -> bool:
        """Corrupt one row, given as the tensors it is made of, in place. True if it was."""
        spec = self.spec
        if not self.is_faulty(row) or spec.kind not in GRADIENT_FAULTS:
            return False
        if spec.kind == "stale":
            previous = self._stale.get(row)
            self._stale[row] = [p.detach().clone() for p in pieces]
            if previous is None:
                return False
            for p, old in zip(pieces, previous, strict=True):
                p.copy_(old)
        elif spec.kind == "sign-flip":
            for p in pieces:
                p.neg_()
        elif spec.kind == "scale":
            for p in pieces:
                p.mul_(spec.scale)
        elif spec.kind == "nonfinite":
            for p in pieces:
                p.fill_(spec.value)
        else:  # noise
            target = spec.noise_norm * _norm(pieces)
            gen = _generator(spec.seed, self.step, row)
            noise = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in pieces]
            factor = target / max(_norm(noise), 1e-300)
            for p, n in zip(pieces, noise, strict=True):
                p.copy_((n * factor).to(p.dtype))
        self.injected += 1
        return True

    def corrupt_rows(self, grads: Tensor, first_row: int = 0) -> list[int]:
        """Corrupt the faulty rows among ``grads`` [m, P] (global rows ``first_row`` …
        ``first_row + m - 1``) in place, then end the step. Returns the local rows hit."""
        hit = [k for k in range(grads.shape[0]) if self.corrupt(first_row + k, [grads[k]])]
        self.end_step()
        return hit

    def gradient_hook(self, params: Iterable[Tensor], num_rows: int, first_row: int = 0,
                      accumulated: bool = False) -> Callable[[int], None]:
        """``fn(k)`` corrupting the ``.grad`` of ``params`` while they hold micro-gradient
        k (global row ``first_row + k``); the step ends after row ``num_rows - 1``. With
        ``accumulated=True`` (``.grad`` holds the running sum, as under ``mode="average"``) the
        hook corrupts the difference from the previous sum, keeping one P-sized copy."""
        if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 1:
            raise ValueError(f"num_rows must be a positive int, got {num_rows!r}")
        params = [p for p in params if p.requires_grad]
        before: list[Tensor | None] = [None] * len(params)

        def on_micro_gradient(k: int, *_ignored) -> None:
            present = [(i, p.grad) for i, p in enumerate(params) if p.grad is not None]
            if not accumulated:
                self.corrupt(first_row + k, [g for _, g in present])
            else:
                if k == 0:
                    before[:] = [None] * len(params)
                own = [g.clone() if before[i] is None else g - before[i] for i, g in present]
                if self.corrupt(first_row + k, own):
                    for (i, g), term in zip(present, own, strict=True):
                        g.copy_(term if before[i] is None else before[i] + term)
                for i, g in present:
                    before[i] = g.detach().clone()
            if k == num_rows - 1:
                self.end_step()

        return on_micro_gradient

    def corrupt_labels(self, targets: Tensor, num_micro_batches: int, num_classes: int,
                       first_row: int = 0) -> Tensor:
        """Targets with the faulty micro-batches' labels all wrong (a new tensor; the
        batch is split into ``num_micro_batches`` as ``GAFTrainer.step`` splits it). A
        no-op for gradient faults. Does not end the step (the gradient side does, or call
        :meth:`end_step`)."""
        if self.spec.kind not in DATA_FAULTS:
            return targets
        if num_classes < 2:
            raise ValueError(f"wrong labels need at least 2 classes, got {num_classes}")
        out = targets.clone()
        parts = torch.tensor_split(torch.arange(targets.shape[0]), num_micro_batches)
        for k, index in enumerate(parts):
            if self.is_faulty(first_row + k) and index.numel():
                gen = _generator(self.spec.seed, self.step, first_row + k)
                shift = torch.randint(1, num_classes, (index.numel(),), generator=gen)
                part = out[index.to(out.device)]
                out[index.to(out.device)] = (part + shift.to(out.device)) % num_classes
                self.injected += 1
        return out


def wrong_labels(targets: Tensor, num_classes: int, seed: int = 0) -> Tensor:
    """Every label replaced by a uniformly drawn different class (seeded)."""
    injector = FaultInjector.make("wrong-labels", [0], seed=seed)
    return injector.corrupt_labels(targets, 1, num_classes)
