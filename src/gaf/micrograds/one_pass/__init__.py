"""One-pass micro-gradients: the Gram matrix and the direction from one forward and one
backward of the whole batch (docs/design.md, "One pass"; algorithm in
:mod:`~gaf.micrograds.one_pass.engine`, per-layer algebra in
:mod:`~gaf.micrograds.one_pass.linear`)."""

from gaf.micrograds.one_pass.engine import OnePassBackend
from gaf.micrograds.one_pass.plan import module_kind, plan_model

__all__ = ["OnePassBackend", "module_kind", "plan_model"]
