"""The kinds of threshold (see :mod:`gaf.thresholds` for the contract they keep)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from gaf.core import FilterResult, check_tau


@runtime_checkable
class Threshold(Protocol):
    def value(self) -> float: ...

    def observe(self, result: FilterResult) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _check_kind(state: dict, kind: str, needed: Sequence[str] = ()) -> None:
    """Refuse the state of another kind of threshold, or one missing ``needed`` keys, with
    a message that says so (a KeyError would name only the key)."""
    if not isinstance(state, Mapping):
        raise ValueError(f"a threshold state must be a dict, got {type(state).__name__}")
    # States saved before thresholds named their kind: a fixed one held only "tau".
    saved = state.get("kind", "fixed" if set(state) == {"tau"} else kind)
    if saved != kind:
        raise ValueError(f"state is for a {saved!r} threshold, not {kind!r}: resume with "
                         f"the kind of threshold the run was saved with")
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(f"{kind!r} threshold state lacks {', '.join(map(repr, missing))}: "
                         "not a state this threshold saved")


class FixedThreshold:
    """A constant tau (the paper's setting)."""

    def __init__(self, tau: float = 0.97):
        self.tau = check_tau(tau)

    def value(self) -> float:
        return self.tau

    def observe(self, result: FilterResult) -> None:
        pass

    def state_dict(self) -> dict:
        return {"kind": "fixed", "tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        """Check that ``state`` was saved with this tau: a fixed tau is a setting of the
        run, so a checkpoint never replaces the one given at construction."""
        _check_kind(state, "fixed", ("tau",))
        saved = check_tau(state["tau"])
        if saved != self.tau:
            raise ValueError(f"state was saved with tau {saved}, but this threshold was "
                             f"built with tau {self.tau}: build it with tau={saved} to "
                             "resume that run")

    def __repr__(self) -> str:
        return f"FixedThreshold({self.tau})"


def as_threshold(tau: float | Threshold) -> Threshold:
    """A number becomes a :class:`FixedThreshold`; a threshold object is used as is."""
    if isinstance(tau, Threshold) and not isinstance(tau, (int, float)):
        return tau
    return FixedThreshold(check_tau(tau))


def tested_distances(result: FilterResult) -> np.ndarray:
    """Distances of the rows that were actually compared: valid rows except the anchor
    (without ``result.valid``, a distance of 2 counts as invalid: no tau below 2 accepts it)."""
    d = result.distances.detach().cpu().double().numpy()
    if result.valid is not None:
        mask = result.valid.detach().cpu().numpy().astype(bool).copy()
    else:
        mask = d < 2.0
    if 0 <= result.anchor < len(d):
        mask[result.anchor] = False
    return d[mask]


def _check_int(name: str, v: object, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def _check_real(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a real number, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _check_bound(name: str, v: object) -> float:
    """A tau bound: a finite number in [0, 2] (ValueError, naming the argument)."""
    v = _check_real(name, v)
    if not 0.0 <= v <= 2.0:
        raise ValueError(f"{name} must lie in [0, 2] (the distance range), got {v}")
    return v


# --------------------------------------------------------------------------------------
# Schedules over training


class _Counted:
    """A threshold of the step count alone (skipped steps count); its state is its
    arguments (``_params``) and ``step``."""

    kind = ""

    def observe(self, result: FilterResult) -> None:
        self.step += 1

    def state_dict(self) -> dict:
        return {"kind": self.kind, "step": self.step, **self._params()}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, self.kind, (*self._params(), "step"))
        self.__init__(**{k: state[k] for k in self._params()})
        self.step = _check_int("step", state["step"], 0)


class ScheduledThreshold(_Counted):
    """tau from ``start`` to ``end`` over ``total_steps`` steps, then constant at ``end``.

    ``schedule="linear"``: tau_t = start + (end - start)·p;  ``"cosine"``:
    tau_t = end + (start - end)·(1 + cos(πp))/2, with p = min(t, total_steps)/total_steps
    and t the number of steps observed so far (skipped steps count).
    """

    SCHEDULES = ("linear", "cosine")
    kind = "scheduled"

    def __init__(self, start: float, end: float, total_steps: int, schedule: str = "linear"):
        self.start = _check_bound("start", start)
        self.end = _check_bound("end", end)
        self.total_steps = _check_int("total_steps", total_steps, 1)
        if schedule not in self.SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of linear, cosine")
        self.schedule = schedule
        self.step = 0

    def value(self) -> float:
        p = min(self.step, self.total_steps) / self.total_steps
        if self.schedule == "linear":
            tau = self.start + (self.end - self.start) * p
        else:
            tau = self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * p))
        return min(2.0, max(0.0, tau))

    def _params(self) -> dict:
        return {"start": self.start, "end": self.end, "total_steps": self.total_steps,
                "schedule": self.schedule}

    def __repr__(self) -> str:
        return (f"ScheduledThreshold({self.start}, {self.end}, {self.total_steps}, "
                f"{self.schedule!r}) at step {self.step}")


class StepThreshold(_Counted):
    """Piecewise constant: ``values[i]`` once ``milestones[i-1]`` steps have been observed.

    ``StepThreshold([2.0, 0.97], [500])`` accepts everything for 500 steps, then filters
    at 0.97. Milestones must increase strictly; ``len(values) == len(milestones) + 1``.
    """

    kind = "step"

    def __init__(self, values: Sequence[float], milestones: Sequence[int]):
        self.values = [_check_bound("values[]", v) for v in values]
        self.milestones = [_check_int("milestones[]", m, 1) for m in milestones]
        if len(self.values) != len(self.milestones) + 1:
            raise ValueError(
                f"need one more value than milestones, got {len(self.values)} values and "
                f"{len(self.milestones)} milestones"
            )
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
            raise ValueError(f"milestones must increase strictly, got {self.milestones}")
        self.step = 0

    def value(self) -> float:
        i = sum(1 for m in self.milestones if self.step >= m)
        return self.values[i]

    def _params(self) -> dict:
        return {"values": list(self.values), "milestones": list(self.milestones)}

    def __repr__(self) -> str:
        return f"StepThreshold({self.values}, {self.milestones}) at step {self.step}"


# --------------------------------------------------------------------------------------
# Adaptive thresholds


class _WindowThreshold:
    """Shared machinery: a window of the most recent tested distances, in arrival order.

    ``value()`` is 2 for the first ``warmup_steps`` steps, then ``initial`` until
    ``min_samples`` distances were seen, then the tau recomputed in ``observe()`` (float64
    numpy over the window in a fixed order: reproducible bit for bit) and cached."""

    kind = "window"

    def __init__(self, window: int, tau_min: float, tau_max: float, initial: float | None,
                 min_samples: int | None, warmup_steps: int = 0):
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        self.window = _check_int("window", window, 1)
        self.tau_min = _check_bound("tau_min", tau_min)
        self.tau_max = _check_bound("tau_max", tau_max)
        if self.tau_min > self.tau_max:
            raise ValueError(f"tau_min {self.tau_min} exceeds tau_max {self.tau_max}")
        self.initial = self._clip(self.tau_max if initial is None
                                  else _check_bound("initial", initial))
        default_min = min(self.window, 20)
        self.min_samples = (default_min if min_samples is None
                            else _check_int("min_samples", min_samples, 1))
        if self.min_samples > self.window:
            raise ValueError(f"min_samples {self.min_samples} exceeds window {self.window}")
        self.distances: deque[float] = deque(maxlen=self.window)
        self.steps = 0
        self._tau = self.initial

    def _clip(self, tau: float) -> float:
        return min(self.tau_max, max(self.tau_min, tau))

    def _compute(self, d: np.ndarray) -> float:
        raise NotImplementedError

    def _refresh(self) -> None:
        if len(self.distances) < self.min_samples:
            self._tau = self.initial
        else:
            tau = self._compute(np.fromiter(self.distances, dtype=np.float64))
            self._tau = self._clip(float(tau)) if math.isfinite(tau) else self.initial

    def value(self) -> float:
        return 2.0 if self.steps < self.warmup_steps else self._tau

    def observe(self, result: FilterResult) -> None:
        self.steps += 1
        self.distances.extend(float(x) for x in tested_distances(result))
        self._refresh()

    def _params(self) -> dict:
        return {"window": self.window, "tau_min": self.tau_min, "tau_max": self.tau_max,
                "initial": self.initial, "min_samples": self.min_samples,
                "warmup_steps": self.warmup_steps}

    def state_dict(self) -> dict:
        return {"kind": self.kind, **self._params(), "steps": self.steps,
                "distances": list(self.distances)}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, self.kind, (*self._params(), "steps", "distances"))
        params = {k: state[k] for k in self._params()}
        self.__init__(**params)
        self.steps = _check_int("steps", state["steps"], 0)
        self.distances.extend(float(x) for x in state["distances"])
        self._refresh()


class MovingAverageThreshold(_WindowThreshold):
    """tau_t = clip(mean + k·std, tau_min, tau_max) over the last ``window`` distances.

    The rule of the GAF authors' research code; ``tau_max`` caps it because the mean itself
    drifts to 1 late in training or under label noise. ``std`` has ddof 0."""

    kind = "moving-average"

    def __init__(self, k: float = 1.0, window: int = 200, tau_max: float = 1.0,
                 tau_min: float = 0.0, initial: float | None = None,
                 min_samples: int | None = None, warmup_steps: int = 0):
        self.k = _check_real("k", k)
        super().__init__(window, tau_min, tau_max, initial, min_samples, warmup_steps)

    def _compute(self, d: np.ndarray) -> float:
        return float(d.mean() + self.k * d.std())

    def _params(self) -> dict:
        return {"k": self.k, **super()._params()}

    def __repr__(self) -> str:
        return (f"MovingAverageThreshold(k={self.k}, window={self.window}, "
                f"tau_max={self.tau_max}) tau={self._tau:.4f}")


class QuantileThreshold(_WindowThreshold):
    """tau_t = the ``target_acceptance``-quantile of the last ``window`` distances: about
    that fraction of tested micro-gradients is accepted (with M = 2 the skip rate is about
    1 - target_acceptance), whatever the measure's scale. numpy's linear interpolation."""

    kind = "quantile"

    def __init__(self, target_acceptance: float = 0.7, window: int = 200,
                 tau_max: float = 2.0, tau_min: float = 0.0, initial: float | None = 1.0,
                 min_samples: int | None = None, warmup_steps: int = 0):
        q = _check_real("target_acceptance", target_acceptance)
        if not 0.0 < q < 1.0:
            raise ValueError(f"target_acceptance must lie in (0, 1), got {q}")
        self.target_acceptance = q
        super().__init__(window, tau_min, tau_max, initial, min_samples, warmup_steps)

    def _compute(self, d: np.ndarray) -> float:
        return float(np.quantile(d, self.target_acceptance))

    def _params(self) -> dict:
        return {"target_acceptance": self.target_acceptance, **super()._params()}

    def __repr__(self) -> str:
        return (f"QuantileThreshold(target_acceptance={self.target_acceptance}, "
                f"window={self.window}) tau={self._tau:.4f}")


class NullTailThreshold(_WindowThreshold):
    """Accept only agreement that chance alone would rarely produce: tau_t = 1 - z·σ̂.

    Write c = 1 - D for the agreement (cosine similarity for the cosine measure). If two
    micro-gradients share no direction, c scatters symmetrically around 0 with some spread
    σ that depends on the model, the batch and the stage of training, not on a tunable.
    Shared signal only ever pushes c *up*, so the micro-gradients that point away from the
    running sum (c < 0, D > 1) are a sample of the chance side alone, and, by symmetry,

        σ̂² = mean of c² over the recent distances with D > 1.

    Accepting c > z·σ̂ is a one-sided test at z standard deviations: z = 1 lets about
    16% of chance-only agreements through, z = 2 about 2%. Until ``min_samples`` distances
    beyond 1 have been seen (early training, when micro-gradients still agree), tau is
    ``initial`` (default 1: accept anything not pointing away). ``tau_max`` defaults to 1
    and the rule never accepts a micro-gradient pointing away from the rest.
    """

    kind = "null-tail"

    def __init__(self, z: float = 1.0, window: int = 200, tau_max: float = 1.0,
                 tau_min: float = 0.0, initial: float | None = 1.0,
                 min_samples: int | None = None, warmup_steps: int = 0):
        self.z = _check_real("z", z)
        if self.z < 0:
            raise ValueError(f"z must be >= 0, got {self.z}")
        super().__init__(window, tau_min, tau_max, initial, min_samples, warmup_steps)

    def _refresh(self) -> None:
        d = np.fromiter(self.distances, dtype=np.float64)
        tail = d[d > 1.0]
        if len(tail) < self.min_samples:
            self._tau = self.initial
        else:
            sigma = math.sqrt(float(np.mean((tail - 1.0) ** 2)))
            self._tau = self._clip(1.0 - self.z * sigma)

    def _params(self) -> dict:
        return {"z": self.z, **super()._params()}

    def __repr__(self) -> str:
        return f"NullTailThreshold(z={self.z}, window={self.window}) tau={self._tau:.4f}"
