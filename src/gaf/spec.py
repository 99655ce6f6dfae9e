"""The filter specification: what a GAF step filters by, declared and checked once.

Every front end takes a :class:`FilterSpec`; keyword arguments (``tau=``, ``rule=``, ...)
stay as sugar that :func:`resolve_spec` turns into one, so a new option is added here and
nowhere else. A spec is frozen, but its threshold and control may hold state: build one
spec per front end when either is stateful.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from gaf.controls import Control
from gaf.core import STREAMING_RULES, check_measure, get_rule
from gaf.thresholds import Threshold, as_threshold

# The keyword arguments that front ends accept as sugar for a spec, with their defaults.
SPEC_DEFAULTS: Mapping[str, object] = MappingProxyType({
    "tau": 0.97,
    "rule": "mean",
    "rule_options": None,
    "measure": "cosine",
    "control": None,
})


@dataclass(frozen=True)
class FilterSpec:
    """Threshold, rule (with its options), agreement measure and blind control of a filter,
    all validated when the spec is built (a wrong option fails at construction).

    Args:
        tau: cosine-distance threshold in [0, 2] (2 accepts everything: the plain mean), or
            a :class:`gaf.thresholds.Threshold` (scheduled or adaptive).
        rule: a rule name of :data:`gaf.ALL_RULES` ("mean", the paper's, by default).
        rule_options: the rule's keyword options, checked against the rule here.
        measure: "cosine" (default), "sign" or "layerwise" (:mod:`gaf.core.measures`).
        control: a blind control (:mod:`gaf.controls`) whose verdicts replace the test
            ``distance <= tau``; ``None`` filters by agreement."""

    tau: float | Threshold = 0.97
    rule: str = "mean"
    rule_options: Mapping = field(default_factory=dict)
    measure: str = "cosine"
    control: Control | None = None

    def __post_init__(self) -> None:
        entry = get_rule(self.rule)
        checked = MappingProxyType(entry.options(self.rule_options))
        threshold = self.tau
        if not isinstance(threshold, Threshold):
            threshold = float(as_threshold(threshold).value())
        if self.control is not None and not isinstance(self.control, Control):
            raise TypeError(
                "control must have draw(num_rows), state_dict() and load_state_dict() "
                f"(see gaf.controls), got {type(self.control).__name__}"
            )
        object.__setattr__(self, "rule", entry.name)
        object.__setattr__(self, "rule_options", checked)
        object.__setattr__(self, "measure", check_measure(self.measure))
        object.__setattr__(self, "tau", threshold)

    @property
    def threshold(self) -> Threshold:
        """The threshold object (a number becomes a fixed threshold, built anew each call)."""
        return as_threshold(self.tau)

    @property
    def streams(self) -> bool:
        """Whether the streaming backend can run this filter (one running sum, cosine)."""
        return self.rule in STREAMING_RULES and self.measure == "cosine"

    @property
    def fixed_tau(self) -> float | None:
        """tau when it is a fixed number, else None (scheduled or adaptive)."""
        return None if isinstance(self.tau, Threshold) else float(self.tau)

    def check_rows(self, num_rows: int) -> None:
        """Raise ValueError if the rule cannot decide over ``num_rows`` micro-gradients
        (multi-Krum with f needs M > 2f + 2); call it wherever M is known before a step,
        e.g. M = ranks × micro-batches per rank."""
        entry = get_rule(self.rule)
        if entry.check_rows is not None:
            entry.check_rows(num_rows, **self.rule_options)

    def describe(self) -> dict:
        """A JSON-able summary (for logs, checkpoints and cross-rank checks)."""
        tau = self.tau if self.fixed_tau is not None else type(self.tau).__name__
        return {
            "tau": tau,
            "rule": self.rule,
            "rule_options": dict(self.rule_options),
            "measure": self.measure,
            "control": None if self.control is None else type(self.control).__name__,
        }


def resolve_spec(spec: FilterSpec | None = None, **options) -> FilterSpec:
    """The spec a front end filters by: ``spec`` as given, or one built from ``options``
    (the sugar keywords of :data:`SPEC_DEFAULTS`; those at their default are ignored). Both a
    spec and a non-default keyword is an error: one of them would be silently dropped."""
    unknown = sorted(set(options) - set(SPEC_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown filter option(s) {', '.join(unknown)}; the options are "
                        f"{', '.join(SPEC_DEFAULTS)}")
    given = {k: v for k, v in options.items() if not _is_default(k, v)}
    if spec is None:
        return FilterSpec(**given)
    if not isinstance(spec, FilterSpec):
        raise TypeError(f"spec must be a gaf.FilterSpec, got {type(spec).__name__}")
    if given:
        raise ValueError(
            f"got both spec= and {', '.join(f'{k}=' for k in given)}: put every filter "
            "option in the spec (dataclasses.replace(spec, ...)) or pass keywords only"
        )
    return spec


def _is_default(name: str, value: object) -> bool:
    default = SPEC_DEFAULTS[name]
    if default is None:
        return value is None
    return type(value) is type(default) and value == default
