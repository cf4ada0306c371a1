"""Value checks shared by the engine's configuration, its sampling parameters and the server's
settings. No torch here: the server's settings import it.

`bool` is an `int` subclass, but `n=True` or `state_size=True` is a caller's bug, not a
count: no check below takes a bool for a number.
"""

from __future__ import annotations

import math


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_positive_int(value: object) -> bool:
    return is_int(value) and value >= 1


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    return is_number(value) and math.isfinite(value)


def require_positive_int(name: str, value: object) -> None:
    if not is_positive_int(value):
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")


def require_count(name: str, value: object) -> None:
    """An integer >= 0 (0 usually turns the feature off)."""
    if not (is_int(value) and value >= 0):
        raise ValueError(f"{name} must be an integer >= 0; got {value!r}")


def require_fraction(name: str, value: object) -> None:
    if not (is_number(value) and 0 < value <= 1):  # also refuses NaN
        raise ValueError(f"{name} must be a number in (0, 1]; got {value!r}")


def require_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
