"""Set one attribute on several objects for the duration of a ``with`` block."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def temporarily(objs: Iterable[Any], attr: str, value: Any) -> Iterator[None]:
    """``obj.attr = value`` for every object while inside; each object's own value is restored on exit
    (also when the block raises)."""
    objs = list(objs)
    before = [getattr(o, attr) for o in objs]
    for o in objs:
        setattr(o, attr, value)
    try:
        yield
    finally:
        for o, b in zip(objs, before):
            setattr(o, attr, b)
