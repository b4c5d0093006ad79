"""Append-only JSON-lines logs of a run (``metrics.jsonl``, ``eval.jsonl``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch


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


def truncate_after(path: str | Path, step: int) -> None:
    """Drop records with ``step`` > ``step`` (used when resuming from an earlier checkpoint)."""
    p = Path(path)
    if not p.is_file():
        return
    keep = [r for r in read_jsonl(p) if r.get("step", 0) <= step]
    p.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
