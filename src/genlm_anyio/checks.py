"""Checking arguments, by one rule: a value of the wrong type raises TypeError, a
value of the right type outside its range raises ValueError, and both name the
argument."""

from __future__ import annotations

import numbers
from typing import Any


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """``value`` as an int, if it is an integer (a bool is not) of at least ``minimum``.

    Raises:
        TypeError: ``value`` is not an integer (naming ``name``).
        ValueError: ``value`` is below ``minimum`` (naming ``name``).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, not {value}")
    return int(value)


def positive_int(name: str, value: Any) -> int:
    """``value``, if it is an int >= 1 (see :func:`check_int`)."""
    return check_int(name, value, minimum=1)


def check_number(name: str, value: Any, *, minimum: float, inclusive: bool = True) -> float:
    """``value`` as a float, if it is a real number (a bool is not) of at least
    ``minimum`` (above it, with ``inclusive=False``; NaN is neither).

    Raises:
        TypeError: ``value`` is not a real number (naming ``name``).
        ValueError: ``value`` is out of range (naming ``name``).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    number = float(value)
    if not (number >= minimum if inclusive else number > minimum):
        raise ValueError(f"{name} must be {'>=' if inclusive else '>'} {minimum}, not {value}")
    return number
