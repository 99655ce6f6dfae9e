"""The references' one validity check: the library's own definition, on a float64 norm."""

from __future__ import annotations

from torch import Tensor

from gaf.core import valid_norm_sq


def is_valid_row(row: Tensor) -> bool:
    """Whether a micro-gradient takes part: finite with non-zero norm
    (:func:`gaf.core.valid_norm_sq` of |row|² in float64, where a float32 row's squares
    can neither overflow nor underflow to zero)."""
    r = row.detach().double().reshape(-1)
    return bool(valid_norm_sq(float(r @ r)))
