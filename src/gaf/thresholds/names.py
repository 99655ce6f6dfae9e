"""Thresholds built by name (CLI, configs): :func:`make_threshold`, :func:`parse_threshold`."""

from __future__ import annotations

from gaf.thresholds.kinds import (
    FixedThreshold,
    MovingAverageThreshold,
    NullTailThreshold,
    QuantileThreshold,
    ScheduledThreshold,
    StepThreshold,
    Threshold,
)

THRESHOLDS: tuple[str, ...] = (
    "fixed", "linear", "cosine", "step", "moving-average", "quantile", "null-tail",
)


def make_threshold(kind: str, **kwargs) -> Threshold:
    """Build a threshold by name with keyword arguments, e.g.
    ``make_threshold("quantile", target_acceptance=0.8)``. ``"linear"``/``"cosine"`` are
    :class:`ScheduledThreshold` with that schedule."""
    if kind == "fixed":
        return FixedThreshold(**kwargs)
    if kind in ("linear", "cosine"):
        return ScheduledThreshold(schedule=kind, **kwargs)
    if kind == "step":
        return StepThreshold(**kwargs)
    if kind == "moving-average":
        return MovingAverageThreshold(**kwargs)
    if kind == "quantile":
        return QuantileThreshold(**kwargs)
    if kind == "null-tail":
        return NullTailThreshold(**kwargs)
    raise ValueError(f"unknown threshold {kind!r}; choose one of {', '.join(THRESHOLDS)}")


def parse_threshold(spec: str) -> Threshold:
    """Build a threshold from a string: a number (fixed tau), a name, or ``name:key=value,...``.

    Examples: ``"0.97"``, ``"null-tail"``, ``"quantile:target_acceptance=0.8,window=100"``,
    ``"linear:start=2,end=0.97,total_steps=1000"``, ``"step:values=2/0.97,milestones=500"``
    (list values separated by ``/``).
    """
    spec = spec.strip()
    try:
        number = float(spec)
    except ValueError:
        number = None  # not a number: a name with options
    if number is not None:
        return FixedThreshold(number)  # an out-of-range tau raises here, as it should
    name, _, rest = spec.partition(":")
    kwargs: dict = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"threshold option {item!r} is not key=value (in {spec!r})")
        key = key.strip().replace("-", "_")
        values = [_parse_number(v) for v in raw.split("/")]
        kwargs[key] = values if key in ("values", "milestones") else values[0]
    try:
        return make_threshold(name.strip(), **kwargs)
    except TypeError as exc:  # unknown keyword
        raise ValueError(f"bad options for threshold {name!r}: {exc}") from exc


def _parse_number(raw: str) -> int | float:
    raw = raw.strip()
    try:
        return int(raw)
    except ValueError:
        try:
            return float(raw)
        except ValueError as exc:
            raise ValueError(f"threshold option value {raw!r} is not a number") from exc
