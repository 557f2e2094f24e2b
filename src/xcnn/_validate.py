"""Argument checks shared across xcnn's floors (they import nothing else of xcnn).

Every public function validates its arguments before any expensive work or any file is written, and raises
``ValueError`` / ``TypeError`` with a message naming the argument, what was expected and what was given.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path

__all__ = ["check_memory", "check_number", "check_positive", "check_seed", "physical_memory", "read_json"]


def check_positive(name: str, value: object, *, integer: bool = True) -> None:
    """Raise a clear error unless ``value`` is a positive integer (or a positive finite number)."""
    kinds = (numbers.Integral,) if integer else (numbers.Real,)
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value < math.inf:
        what = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name} must be {what}, got {value!r}")


def check_number(
    name: str,
    value: object,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> int | float:
    """``value`` as an int (``integer``) or a float, checked to be finite and inside the given bounds
    (``low_open`` / ``high_open`` exclude the bound itself); booleans and strings are refused with a ``TypeError``."""
    kinds = (numbers.Integral,) if integer else (numbers.Real,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        what = "an integer" if integer else "a number"
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    number = int(value) if integer else float(value)  # a huge int stays exact (float() of 10**400 overflows)
    if not integer and not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high:
        left = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        right = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        bounds = f"in {left or '(-inf'}, {right or 'inf)'}"
        raise ValueError(f"{name} must be {bounds}, got {value!r}")
    return number


def check_seed(seed: object, name: str = "seed") -> int:
    """A seed as ``torch.manual_seed`` / ``torch.Generator.manual_seed`` take it: an integer in [-2**63, 2**64)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(seed).__name__} {seed!r}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"{name} must be an integer in [-2**63, 2**64), got {seed}")
    return int(seed)


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(nbytes: float, what: str) -> None:
    """Refuse an allocation of ``nbytes`` that cannot fit this machine's physical memory, before it is tried
    (a mistyped size then gets an error naming it instead of an allocator failure or a swapping machine)."""
    total = physical_memory()
    if total is not None and nbytes > total:
        need = f"{nbytes / 2**30:.3g}" if nbytes < 2**100 else "more than 1e21"  # a huge int overflows a float
        raise ValueError(f"{what} would need {need} GiB, more than this machine's {total / 2**30:.3g} GiB")


def read_json(path: str | Path, what: str = "JSON file") -> object:
    """Parse the JSON file ``path``; an unreadable, malformed or absurdly nested file is a ``ValueError`` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except RecursionError:  # json recurses per nesting level: a hostile file can exhaust the stack
        raise ValueError(f"cannot read {what} {path}: nested too deeply") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from err
