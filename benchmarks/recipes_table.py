"""Combine benchmarks/results/recipes_evidence_s*.json (one file per evidence invocation) into per-claim
tables of mean, sd and per-seed values: ``python benchmarks/recipes_table.py`` prints Markdown."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load() -> dict[str, dict[str, dict[int, dict]]]:
    """claim -> run name -> seed -> row."""
    out: dict = {}
    for f in sorted(RESULTS.glob("recipes_evidence_s*.json")):
        res = json.loads(f.read_text())
        for c, r in res["claims"].items():
            for seed, rows in zip(res["seeds"], r["per_seed"]):
                for row in rows:
                    out.setdefault(c, {}).setdefault(row["run"], {})[seed] = row
    return out


def fmt(vals: list[float]) -> str:
    vals = [v for v in vals if not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "-"
    m = statistics.mean(vals)
    sd = f" ± {statistics.stdev(vals):.3g}" if len(vals) > 1 else ""
    return f"{m:.4g}{sd} ({', '.join(f'{v:.4g}' for v in vals)})"


def table(runs: dict[str, dict[int, dict]]) -> str:
    cols = [k for k in next(iter(next(iter(runs.values())).values())) if k != "run"]
    lines = ["| run | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for name, by_seed in runs.items():
        seeds = sorted(by_seed)
        cells = [fmt([by_seed[s].get(c, float("nan")) for s in seeds]) for c in cols]
        lines.append(f"| {name} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    for c, runs in load().items():
        print(f"### Claim {c}\n\n{table(runs)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
