"""One-pass micro-gradients: the Gram matrix and the direction from one forward and one
backward of the whole batch (docs/design.md, "One pass").

:mod:`~gaf.micrograds.one_pass.engine` the backend and its algorithm;
:mod:`~gaf.micrograds.one_pass.plan` which modules it captures;
:mod:`~gaf.micrograds.one_pass.pieces` what every layer handler shares;
:mod:`~gaf.micrograds.one_pass.linear` (Linear, Embedding),
:mod:`~gaf.micrograds.one_pass.conv` and :mod:`~gaf.micrograds.one_pass.norm` the algebra
per layer kind. The front ends (:class:`gaf.OnePassFilter`, ``GAFTrainer(...,
micro_gradients="one-pass")``) are a :class:`gaf.GradientCollector` over this backend.
"""

from gaf.micrograds.one_pass.engine import OnePassBackend
from gaf.micrograds.one_pass.plan import module_kind, plan_model

__all__ = ["OnePassBackend", "module_kind", "plan_model"]
