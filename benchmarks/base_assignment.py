"""BASE layers' balanced assignment: the exact Hungarian solve vs fairseq's auction + negative-cycle
canceling (moelab's default beyond ``EXACT_MAX_TOKENS`` tokens), time and objective gap, CPU.

Scores: ``N(0, 1)`` per (token, expert) plus a per-expert offset ``N(0, 1)`` (some experts popular, as a
router that needs balancing). Timing: interleaved rounds, medians (``common.time_interleaved``); the
same score matrix for both solvers in a case. Target: under 20 ms at T=512, E=8 with an objective
within 0.1% of the exact one.

    python benchmarks/base_assignment.py [--rounds 7] [--quick]

Writes benchmarks/results/base_assignment.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Case, machine_info, markdown_table, median, time_interleaved, write_results  # noqa: E402

from moelab.layers.routers.base_layers import auction_balanced_assignment, exact_balanced_assignment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="3 rounds, T in {512} only")
    ap.add_argument("--name", default="base_assignment", help="results file name")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shapes = [(512, 8)] if args.quick else [(512, 8), (500, 8), (2048, 8), (1024, 16)]
    rounds = 3 if args.quick else args.rounds
    rows = []
    for T, E in shapes:
        rng = np.random.default_rng(T + E)
        s = rng.normal(size=(T, E)) + rng.normal(size=(1, E))
        cases = [Case("exact", lambda s=s: exact_balanced_assignment(s)),
                 Case("auction", lambda s=s: auction_balanced_assignment(s))]
        times = time_interleaved(cases, rounds=rounds, warmup=1)
        obj = {c.name: float(s[np.arange(T), c.fn()].sum()) for c in cases}
        ex_ms, au_ms = median(times["exact"]), median(times["auction"])
        rows.append({"T": T, "E": E, "exact_ms": ex_ms, "auction_ms": au_ms, "speedup": ex_ms / au_ms,
                     "objective_gap_pct": 100 * (obj["exact"] - obj["auction"]) / abs(obj["exact"]),
                     "under_20ms": au_ms < 20, "times_ms": times})
        r = rows[-1]
        print(f"T={T} E={E}: exact {ex_ms:.1f} ms, auction {au_ms:.1f} ms ({r['speedup']:.1f}x), "
              f"gap {r['objective_gap_pct']:.2e}%", flush=True)
    info = machine_info()
    md = ["# BASE layers: balanced assignment, exact vs auction + cycle canceling (CPU, 1 thread)\n",
          f"Machine: {info['cpu_count']} CPUs, torch {info['torch']}, load average {info['load_avg_1m']:.1f} at "
          f"{info['time']}; {rounds} interleaved rounds, medians. Target: auction under 20 ms at T=512, E=8, "
          "objective gap under 0.1%.\n",
          markdown_table(rows, ["T", "E", "exact_ms", "auction_ms", "speedup", "objective_gap_pct", "under_20ms"])]
    write_results(args.name, {"machine": info, "rows": rows, "rounds": rounds, "quick": args.quick}, "\n".join(md))


if __name__ == "__main__":
    main()
