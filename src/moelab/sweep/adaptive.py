"""Adding seeds until a sweep decides: ``moelab sweep SPEC --until-conclusive --max-seeds N``.

After each round the leaderboard's pairwise comparisons (paired by default) are read; while some pair
is inconclusive and the spec has fewer than ``max_seeds`` seeds, the next seeds are added — as many
as the largest finite "seeds to decide" of the inconclusive pairs asks for, at least one — and the
new runs are trained (the finished ones are kept). Stops when every pair has a verdict, when the
budget of seeds is spent, or when a round fails or is interrupted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moelab.errors import check_range


def undecided(lb) -> list[Any]:
    """The pair rows of leaderboard ``lb`` without a verdict."""
    return [p for p in lb.pairs if p.comparison is None or p.verdict == "inconclusive"]


def next_seed_count(lb, current: int, max_seeds: int) -> int:
    """How many seeds the next round should have (``current`` when nothing is undecided)."""
    open_pairs = undecided(lb)
    if not open_pairs:
        return current
    wanted = [p.seeds_needed for p in open_pairs if p.seeds_needed is not None]
    target = max(wanted) if wanted else current + 1
    return max(current + 1, min(target, max_seeds))


def run_until_conclusive(spec, sweep_dir: str | Path, *, max_seeds: int, run_kwargs: dict[str, Any],
                         report_kwargs: dict[str, Any], say=print):
    """Run ``spec``; add seeds while a pair is undecided (see the module docstring). Returns the last
    (SweepResult, Leaderboard)."""
    from moelab.sweep.leaderboard import build_leaderboard
    from moelab.sweep.runner import run_sweep

    check_range("max_seeds", max_seeds, low=len(spec.seeds))
    while True:
        result = run_sweep(spec, sweep_dir, **run_kwargs)
        lb = build_leaderboard(sweep_dir, **report_kwargs)
        if not result.ok:
            return result, lb
        n = next_seed_count(lb, len(spec.seeds), max_seeds)
        if n <= len(spec.seeds):
            say(f"until-conclusive: every pair decided with {len(spec.seeds)} seeds"
                if not undecided(lb) else f"until-conclusive: budget of {max_seeds} seeds spent; "
                f"{len(undecided(lb))} pair(s) still undecided")
            return result, lb
        start = max(spec.seeds) + 1
        spec.seeds = list(spec.seeds) + list(range(start, start + n - len(spec.seeds)))
        spec.check()
        say(f"until-conclusive: {len(undecided(lb))} pair(s) undecided; adding seeds -> {spec.seeds}")
