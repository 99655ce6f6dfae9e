"""The cross-rank check: before the collector is built and before every exchange, ranks
all-gather a few integers (P, m, dtype, rule, tau, method, layout, rule options), so that
ranks that disagree fail together with the same clear error (``check=False`` drops it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from gaf.core import ALL_RULES
from gaf.distributed.comm import Comm, GAFDistributedError, all_gather_flat

METHODS: tuple[str, ...] = ("sharded", "allgather")

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float32: 3,
    torch.float64: 4,
}


def layout_hash(shapes: Sequence[Sequence[int]]) -> int:
    """A stable 62-bit hash of a parameter layout (list of shapes), equal on every rank."""
    text = ";".join(",".join(str(int(d)) for d in shape) for shape in shapes)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 2


FIELDS = (
    "P (elements per micro-gradient)",
    "m (micro-gradients on the rank)",
    "dtype",
    "rule",
    "tau",
    "method",
    "number of trainable parameters",
    "parameter shapes (hash)",
    "rule options (hash)",
)


def tau_bits(tau: float) -> int:
    return int(np.array(tau, dtype=np.float64).view(np.int64))


def _describe(field: str, value: int) -> str:
    if field == "dtype":
        names = {code: str(dt) for dt, code in DTYPE_CODES.items()}
        return names.get(value, f"code {value}")
    if field == "rule":
        return ALL_RULES[value] if 0 <= value < len(ALL_RULES) else f"code {value}"
    if field == "tau":
        return repr(float(np.array(value, dtype=np.int64).view(np.float64)))
    if field == "method":
        return METHODS[value] if 0 <= value < len(METHODS) else f"code {value}"
    if field.endswith("(hash)"):
        return f"{value:016x}"
    return str(value)


def options_hash(options: Mapping | None) -> int:
    """A stable 62-bit hash of a rule's options (0 for none), equal on every rank."""
    if not options:
        return 0
    text = ";".join(f"{k}={options[k]!r}" for k in sorted(options))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 2


def step_fields(numel: int, rows: int, dtype: torch.dtype, rule: str, tau: float, method: str,
                layout: Sequence[Sequence[int]] | None, options: Mapping | None = None
                ) -> tuple[int, ...]:
    """The values :func:`check_settings` compares, one per entry of ``FIELDS``."""
    return (
        numel, rows, DTYPE_CODES.get(dtype, 0), ALL_RULES.index(rule) if rule in ALL_RULES else -1,
        tau_bits(tau), METHODS.index(method),
        len(layout) if layout is not None else 0,
        layout_hash(layout) if layout is not None else 0,
        options_hash(options),
    )


def check_settings(comm: Comm, values: Sequence[int], device: torch.device, what: str) -> None:
    """All-gather ``values`` (from :func:`step_fields`) and raise on every rank if any
    differ. Every rank sees the same table, so every rank raises the same error."""
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    table = torch.empty(comm.size * mine.numel(), dtype=torch.int64, device=device)
    comm.run(f"cross-rank check before {what}", all_gather_flat, table, mine)
    rows = table.view(comm.size, -1).cpu().tolist()
    problems = []
    for k, field in enumerate(FIELDS):
        column = [row[k] for row in rows]
        if len(set(column)) > 1:
            per_rank = ", ".join(
                f"rank {r}: {_describe(field, v)}" for r, v in enumerate(column)
            )
            problems.append(f"{field} differs ({per_rank})")
    if problems:
        raise GAFDistributedError(
            f"GAF ranks disagree before {what}: " + "; ".join(problems) + ". Every rank must "
            "hold the same model, collect the same number of micro-batches per step and use "
            "the same tau, rule and method."
        )
