"""Thresholds: the tau a filtered step uses, and how it may change over training.

A threshold is a small stateful object. The filter asks it for ``value()`` once at the
start of a step and tells it the step's :class:`~gaf.core.FilterResult` through
``observe()`` afterwards. Every statistic it sees lives on the host and is identical on
every rank (it is derived from the same all-reduced Gram matrix), so thresholds stay in
step across ranks without communication. State round-trips through ``state_dict()``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from gaf.core import FilterResult, check_tau


@runtime_checkable
class Threshold(Protocol):
    def value(self) -> float: ...

    def observe(self, result: FilterResult) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class FixedThreshold:
    """A constant tau (the paper's setting)."""

    def __init__(self, tau: float = 0.97):
        self.tau = check_tau(tau)

    def value(self) -> float:
        return self.tau

    def observe(self, result: FilterResult) -> None:
        pass

    def state_dict(self) -> dict:
        return {"tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        self.tau = check_tau(state["tau"])

    def __repr__(self) -> str:
        return f"FixedThreshold({self.tau})"


def as_threshold(tau: float | Threshold) -> Threshold:
    """A number becomes a :class:`FixedThreshold`; a threshold object is used as is."""
    if isinstance(tau, Threshold) and not isinstance(tau, (int, float)):
        return tau
    return FixedThreshold(check_tau(tau))
