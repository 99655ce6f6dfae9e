"""The distributed backend: a step's rows on every rank, filtered by the protocol.

Like the stacked backend, each rank keeps its m micro-gradients as rows; ``finish`` runs
:func:`gaf.distributed.protocol.run_protocol` over all N·m of them and, if buffers were
given, brings them in sync. See docs/design.md, "The distributed protocol".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from gaf.core import FilterResult
from gaf.distributed.comm import Comm, Workspace
from gaf.distributed.protocol import run_protocol
from gaf.micrograds import FlatGradients, StackedBackend
from gaf.spec import FilterSpec


class DistributedBackend(StackedBackend):
    """Stacked rows on this rank; the decision over every rank's rows."""

    mode = "stacked"

    def __init__(self, flat: FlatGradients, spec: FilterSpec, comm: Comm, method: str,
                 check: bool, sync=None, gather: str = "auto"):
        self.check_spec(spec)
        super().__init__(flat, spec)
        self.comm = comm
        self.method = method
        self.check = check
        self.gather = gather
        self.layout: Sequence[tuple] = [tuple(s) for s in flat.shapes]
        # Exchange buffers are kept between steps: no allocation per step.
        self.workspace = Workspace()
        self.sync = sync  # called after every step (buffer synchronisation), or None

    @staticmethod
    def check_spec(spec: FilterSpec) -> None:
        """Refuse what the protocol cannot run (before any collective is attempted)."""
        if spec.measure != "cosine":
            raise ValueError(
                f"measure {spec.measure!r} is not implemented across ranks: the distributed "
                "protocol exchanges the Gram matrix of the cosine measure only")

    @property
    def world_size(self) -> int:
        return self.comm.size

    def finish(self, count: int, tau: float, verdicts: np.ndarray | None) -> FilterResult:
        result = super().finish(count, tau, verdicts)
        if self.sync is not None:
            self.sync()
        return result

    def filter_rows(self, rows: Tensor, tau: float, verdicts: np.ndarray | None
                    ) -> FilterResult:
        # Skipped steps are skipped on every rank, and their direction is thrown away:
        # save the final gather.
        return run_protocol(rows, tau, self.rule, self.comm, method=self.method,
                            check=self.check, layout=self.layout, out=self.output.get(),
                            workspace=self.workspace, gather_if_skipped=False,
                            verdicts=verdicts, rule_options=self.rule_options,
                            gather=self.gather)

    def state(self) -> dict:
        return {"method": self.method}
