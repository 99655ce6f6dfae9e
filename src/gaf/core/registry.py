"""The one list of rules, and :func:`decide`, which runs one of them.

To add a rule, write ``rule(oracle, tau, valid, verdicts, **options) -> Decision`` in a
module of :mod:`gaf.core` and add one :class:`Rule` entry to ``_BUILTIN`` below (or call
:func:`register_rule`); docs/design.md, "Adding a rule".
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from gaf.core.decision import Decision, DistanceOracle, GramOracle, check_verdicts, nothing_valid
from gaf.core.distance import check_tau
from gaf.core.robust import (
    check_krum,
    check_krum_options,
    check_median_options,
    geometric_median_rule,
    multi_krum_rule,
)
from gaf.core.rules import (
    anchor_rule,
    consensus_rule,
    halving_rule,
    mean_rule,
    neighbours_rule,
)


@dataclass(frozen=True)
class Rule:
    """A rule and what the front ends need to know about it.

    ``decide(oracle, tau, valid, verdicts, **options) -> Decision``. ``streaming``: it is
    a sequential fold (:func:`gaf.core.rules.fold_row`) the streaming collector can run
    with O(P) memory, ``halving`` then says which one. ``anchored``: its first valid row
    is always accepted. ``gram_only``: it needs ``oracle.gram`` (the cosine measure).
    ``uses_tau``: it tests distances against tau (robust aggregators may not).
    ``check_options(**options) -> dict``: validated options (default: the keyword
    arguments of ``decide``, nothing else). ``check_rows(num_rows, **options)``: raises if
    the rule cannot decide over that many rows (multi-Krum needs M > 2f + 2), so a front
    end that knows M can refuse at construction rather than at the first step.
    """

    name: str
    decide: Callable[..., Decision]
    summary: str
    streaming: bool = False
    halving: bool = False
    anchored: bool = True
    gram_only: bool = False
    uses_tau: bool = True
    check_options: Callable[..., dict] | None = None
    check_rows: Callable[..., object] | None = None

    def options(self, options: Mapping | None) -> dict:
        """``options`` checked for this rule (an empty dict when None): the one check of
        ``rule_options``, which :class:`gaf.FilterSpec` and :func:`decide` both use."""
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise TypeError(
                f"rule_options must be a mapping of the rule's keyword options (e.g. "
                f"{{'f': 1}}), got {type(options).__name__} {options!r}"
            )
        options = dict(options)
        if self.check_options is not None:
            return dict(self.check_options(**options))
        allowed = [p.name for p in inspect.signature(self.decide).parameters.values()
                   if p.kind == p.KEYWORD_ONLY]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(
                f"rule {self.name!r} takes no option {', '.join(map(repr, unknown))}"
                + (f"; its options are {', '.join(allowed)}" if allowed else "")
            )
        return options


_BUILTIN = (
    Rule("mean", mean_rule, "the paper's rule: each row against the running sum",
         streaming=True),
    Rule("halving", halving_rule, "as mean, the running sum halved on each acceptance",
         streaming=True, halving=True),
    Rule("anchor", anchor_rule, "each row against the anchor row alone"),
    Rule("neighbours", neighbours_rule,
         "the row with most neighbours within tau, and its neighbours"),
    Rule("consensus", consensus_rule,
         "each row against the sum of all the others; no anchor", anchored=False),
)
# Robust aggregators (gaf.core.robust): Gram rules with options, no tau test.
_ROBUST = (
    Rule("multi-krum", multi_krum_rule,
         "the m rows closest to their M - f - 2 nearest neighbours (Krum: m = 1)",
         anchored=False, gram_only=True, uses_tau=False, check_options=check_krum_options,
         check_rows=check_krum),
    Rule("geometric-median", geometric_median_rule,
         "weights of the geometric median (smoothed Weiszfeld)",
         anchored=False, gram_only=True, uses_tau=False, check_options=check_median_options),
)

REGISTRY: dict[str, Rule] = {rule.name: rule for rule in _BUILTIN + _ROBUST}

# The agreement rules (each row tested against tau), in a fixed order.
RULES: tuple[str, ...] = tuple(r.name for r in _BUILTIN)
# The robust aggregators over the Gram matrix (gaf.core.robust); tau is not used.
ROBUST_RULES: tuple[str, ...] = tuple(r.name for r in _ROBUST)
# Every built-in rule, in a fixed order (the distributed check encodes a rule by it).
ALL_RULES: tuple[str, ...] = RULES + ROBUST_RULES
# Rules with an anchor row that is always accepted (with one valid row they accept one).
ANCHORED_RULES: tuple[str, ...] = tuple(r.name for r in _BUILTIN if r.anchored)
# Rules the streaming collector runs as a fold, with one running sum.
STREAMING_RULES: tuple[str, ...] = tuple(r.name for r in _BUILTIN if r.streaming)


def register_rule(rule: Rule) -> Rule:
    """Add a rule to the registry (its name must be new); returns it."""
    if not isinstance(rule, Rule):
        raise TypeError(f"register_rule takes a gaf.core.Rule, got {type(rule).__name__}")
    if rule.name in REGISTRY:
        raise ValueError(f"a rule named {rule.name!r} is already registered")
    REGISTRY[rule.name] = rule
    return rule


def get_rule(rule: object) -> Rule:
    """The registry entry of ``rule`` (a name), or a ValueError listing the choices."""
    if not isinstance(rule, str) or rule not in REGISTRY:
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[rule]


def check_rule(rule: object) -> str:
    """Return rule if it names a known rule, else raise ValueError listing the choices."""
    return get_rule(rule).name


def decide(gram: Tensor | np.ndarray, tau: float, rule: str = "mean",
           verdicts: np.ndarray | None = None, options: Mapping | None = None) -> Decision:
    """Run ``rule`` on the Gram matrix of M micro-gradients (rows in their fixed order), in
    float64 on the host: moving ``gram`` there is a filtered step's one device→host transfer.
    ``verdicts`` (a blind control's) replace ``distance <= tau``; ``options``: the rule's."""
    return decide_with(GramOracle(gram), tau, rule, verdicts, options)


def decide_with(oracle: DistanceOracle, tau: float, rule: str = "mean",
                verdicts: np.ndarray | None = None, options: Mapping | None = None
                ) -> Decision:
    """Run ``rule`` with distances from ``oracle`` (see :mod:`gaf.core` for the rules).

    Invalid rows are never accepted and report distance 2; a decision with no valid row
    accepts nothing.
    """
    tau = check_tau(tau)
    entry = get_rule(rule)
    options = entry.options(options) if options else {}  # no options: nothing to check
    if entry.gram_only and oracle.gram is None:
        raise ValueError(f"rule {entry.name!r} needs the Gram matrix: use measure='cosine'")
    valid = np.asarray(oracle.valid, dtype=bool)
    verdicts = check_verdicts(verdicts, len(valid))
    if not valid.any():
        decision = nothing_valid(valid)
    else:
        decision = entry.decide(oracle, tau, valid, verdicts, **options)
    decision.finite = np.asarray(oracle.finite, dtype=bool)
    return decision
