"""Argument checks shared across xcnn's floors (they import nothing else of xcnn).

Every public function validates its arguments before any expensive work or any file is written, and raises
``ValueError`` / ``TypeError`` with a message naming the argument, what was expected and what was given.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "check_memory",
    "check_number",
    "check_numbers",
    "check_positive",
    "check_seed",
    "parse_json",
    "physical_memory",
    "preview",
    "read_json",
]


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
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {preview(value)}")
    try:
        number = int(value) if integer else float(value)  # a huge int stays exact where an integer is asked for
    except OverflowError:  # float() of 10**400: beyond a float's range
        number = math.inf
    if not integer and not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {preview(value)}")
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high:
        left = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        right = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        bounds = f"in {left or '(-inf'}, {right or 'inf)'}"
        raise ValueError(f"{name} must be {bounds}, got {preview(value)}")
    return number


def check_numbers(
    name: str,
    values: object,
    count: int,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    expected: str | None = None,
) -> tuple[int | float, ...]:
    """``values`` as ``count`` numbers, each checked by :func:`check_number` (named ``name[i]``, within ``low``
    and ``high``). ``values`` is any iterable but a string (a list, a tuple, ``dict.keys()``, a tensor or an
    array, flattened) of real numbers, 0-d tensors or numpy scalars; with ``integer``, integer-valued floats
    count as integers (a size computed as ``64.0``). Not an iterable: a ``TypeError``; another count: a
    ``ValueError``; both say ``name must be {expected}`` (default: ``count`` integers / numbers)."""
    expected = expected or f"{count} {'integers' if integer else 'numbers'}"
    if getattr(values, "ndim", 1) > 1 and hasattr(values, "reshape"):  # a [1,3,1,1] tensor, a [3,1] array
        values = values.reshape(-1)
    try:
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise TypeError
        items = list(itertools.islice(values, count + 1))  # never more than needed (an endless iterator)
    except TypeError:  # iter() of a 0-d tensor or array raises it
        raise TypeError(f"{name} must be {expected}, got {type(values).__name__} {preview(values)}") from None
    if len(items) != count:
        raise ValueError(f"{name} must be {expected}, got {preview(values)}")
    return tuple(
        check_number(f"{name}[{i}]", _plain_number(v, integer), integer=integer, low=low, high=high)
        for i, v in enumerate(items)
    )


def _plain_number(value: object, integer: bool) -> object:
    """A 0-d tensor or array as its Python number; with ``integer``, an integer-valued float as an int;
    anything else unchanged (for :func:`check_number` to judge)."""
    if not isinstance(value, numbers.Number) and getattr(value, "shape", None) == () and hasattr(value, "item"):
        value = value.item()
    if integer and isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        try:
            return int(value) if float(value).is_integer() else value
        except OverflowError:  # beyond a float's range: check_number names it
            return value
    return value


def preview(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a 10**400 or a hostile file's content must not flood a
    message)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's 4300-digit conversion limit
        text = f"an integer of {value.bit_length()} bits"
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def parse_json(text: str, where: str) -> object:
    """Parse the JSON ``text`` read from ``where`` (named in the message: ``"model description in FILE"``); a
    malformed or absurdly nested text is a ``ValueError``."""
    try:
        return json.loads(text)
    except RecursionError:  # json recurses per nesting level: a hostile text can exhaust the stack
        raise ValueError(f"cannot read {where}: nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, an integer beyond Python's 4300-digit conversion limit
        raise ValueError(f"cannot read {where}: {err}") from err


def read_json(path: str | Path, what: str = "JSON file") -> object:
    """Parse the JSON file ``path``; an unreadable, malformed or absurdly nested file is a ``ValueError`` naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from err
    return parse_json(text, f"{what} {path}")
