"""Errors that name the parameter, the value and what was expected."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class MoelabError(ValueError):
    """Base class of moelab's input errors (a ValueError, so callers may catch either)."""


def did_you_mean(value: Any, choices: Iterable[Any]) -> str:
    """``"; did you mean 'train'?"`` for the closest choices to a mistyped string, else ``""``."""
    import difflib

    names = [c for c in choices if isinstance(c, str)]
    close = difflib.get_close_matches(str(value), names, n=3, cutoff=0.6) if isinstance(value, str) else []
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


def check_choice(param: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise naming all valid choices (and the
    closest ones to a mistyped string)."""
    choices = list(choices)
    if value not in choices:
        raise MoelabError(
            f"{param}={value!r} is not valid; choose one of: {', '.join(map(repr, choices))}"
            + did_you_mean(value, choices)
        )
    return value


def check_range(
    param: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Raise unless ``low <= value <= high`` (bounds optional, inclusivity configurable)."""
    ok = True
    if low is not None:
        ok &= value >= low if low_inclusive else value > low
    if high is not None:
        ok &= value <= high if high_inclusive else value < high
    if not ok:
        lo = "" if low is None else (f"{low} <= " if low_inclusive else f"{low} < ")
        hi = "" if high is None else (f" <= {high}" if high_inclusive else f" < {high}")
        raise MoelabError(f"{param}={value!r} is out of range; expected {lo}{param}{hi}")
    return value
