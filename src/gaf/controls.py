"""Blind controls: decisions that ignore the gradients, taken through the same step as GAF.

GAF changes how many steps (or micro-batches) are used and which; a control keeps the
first and randomises the second, so comparing GAF with its control at the same rate
isolates what the choice by agreement is worth. A control's verdicts replace the test
``distance <= tau`` (:func:`gaf.core.decide`, ``verdicts=``); validity, the anchor,
distances and weights stay the rule's, so a control accepting every row takes GAF's step
at tau = 2, bit for bit. ``RandomSkip(p)``: with probability p every verdict is False (the
step is skipped), otherwise all True. ``RandomDrop(q)``: each verdict is False with
probability q, independently (the blind counterpart of GAF for M > 2).

Each control owns a seeded ``numpy.random.Generator`` kept in :meth:`state_dict`, so a
resumed run draws the same verdicts. The collector draws a step's verdicts before the rule
sees any distance; distributed, every rank must build its control with the same seed.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Control(Protocol):
    """What a collector needs from a blind control."""

    def draw(self, num_rows: int) -> np.ndarray: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _check_probability(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a probability (a real number), got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return value


def _check_rows(num_rows: object) -> int:
    if isinstance(num_rows, bool) or not isinstance(num_rows, (int, np.integer)) or num_rows < 1:
        raise ValueError(f"num_rows must be a positive int, got {num_rows!r}")
    return int(num_rows)


class _RandomControl:
    """A rate, a seed and the generator they drive (shared by the two controls)."""

    kind = ""
    rate_name = ""

    def __init__(self, rate: float, seed: int = 0):
        self._rate = _check_probability(self.rate_name, rate)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)

    def _get_rate(self) -> float:
        return self._rate

    def _set_rate(self, value: float) -> None:
        self._rate = _check_probability(self.rate_name, value)

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            self.rate_name: self._rate,
            "seed": self.seed,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"state is of control {state['kind']!r}, not {self.kind!r}")
        self._set_rate(state[self.rate_name])
        self.seed = int(state["seed"])
        self.rng.bit_generator.state = state["rng"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.rate_name}={self._rate}, seed={self.seed})"


class RandomSkip(_RandomControl):
    """Skip each step with probability ``p`` (settable), else accept every valid row."""

    kind = "random-skip"
    rate_name = "p"
    p = property(_RandomControl._get_rate, _RandomControl._set_rate,
                 doc="Probability of skipping a step, in [0, 1].")

    def __init__(self, p: float, seed: int = 0):
        super().__init__(p, seed)

    def draw(self, num_rows: int) -> np.ndarray:
        """One uniform per step: all verdicts False (skip) with probability p, else True."""
        num_rows = _check_rows(num_rows)
        skip = bool(self.rng.random() < self._rate)
        return np.full(num_rows, not skip, dtype=bool)


class RandomDrop(_RandomControl):
    """Drop each row with probability ``q`` (settable), independently of the others."""

    kind = "random-drop"
    rate_name = "q"
    q = property(_RandomControl._get_rate, _RandomControl._set_rate,
                 doc="Probability of dropping a row, in [0, 1].")

    def __init__(self, q: float, seed: int = 0):
        super().__init__(q, seed)

    def draw(self, num_rows: int) -> np.ndarray:
        """One uniform per row: verdict True (keep) with probability 1 - q."""
        num_rows = _check_rows(num_rows)
        return self.rng.random(num_rows) >= self._rate
