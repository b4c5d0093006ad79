"""Append-only JSON-lines logs of a run (``metrics.jsonl``, ``eval.jsonl``)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelab.data.corpus import atomic_write_bytes


def jsonable(x: Any) -> Any:
    """Plain JSON values from tensors, numpy values and tuples; non-finite floats become None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if torch.is_tensor(x):
        return jsonable(x.item() if x.numel() == 1 else x.tolist())
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        return jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class JsonlLog:
    """One JSON object per line, flushed after every record (a crash loses at most one line)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(jsonable(record)) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a truncated last line (crash while writing) is skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_after(path: str | Path, step: int, warn: Callable[[str], None] | None = None) -> None:
    """Drop records with ``step`` > ``step`` (used when resuming from an earlier checkpoint); atomic.

    A line that is not valid JSON is never dropped silently: one among the kept records is kept
    verbatim, one after them (a line cut by a crash, or a record past ``step``) is dropped; either
    way ``warn`` is told the file and line number.
    """
    p = Path(path)
    if not p.is_file():
        return
    lines = p.read_text(encoding="utf-8").splitlines()
    steps = [_step_of(line) for line in lines]
    last_kept = max((i for i, s in enumerate(steps) if s is not None and s <= step), default=-1)
    keep = []
    for i, (line, s) in enumerate(zip(lines, steps)):
        if s is None and line.strip():
            fate = "kept as is" if i < last_kept else "dropped"
            if warn is not None:
                warn(f"warning: {p.name} line {i + 1} is not a valid JSON record ({line[:60]!r}); {fate}")
        if (s is None and i < last_kept and line.strip()) or (s is not None and s <= step):
            keep.append(line + "\n")
    atomic_write_bytes(p, "".join(keep).encode("utf-8"))


def _step_of(line: str) -> int | None:
    """The ``step`` of a JSON-lines record, None for a malformed line (0 when a record has no step)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return int(rec.get("step", 0)) if isinstance(rec, dict) and isinstance(rec.get("step", 0), (int, float)) else None
