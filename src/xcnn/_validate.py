"""Argument checks shared across xcnn's floors (they import nothing else of xcnn)."""

from __future__ import annotations

import math
import numbers

__all__ = ["check_positive"]


def check_positive(name: str, value: object, *, integer: bool = True) -> None:
    """Raise a clear error unless ``value`` is a positive integer (or a positive finite number)."""
    kinds = (numbers.Integral,) if integer else (numbers.Real,)
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value < math.inf:
        what = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name} must be {what}, got {value!r}")
