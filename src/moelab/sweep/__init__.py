"""Sweeps: a base config plus axes × seeds, run resumably and fairly, summarised with statistics.

``SweepSpec`` (spec.py) expands into runs; ``plan_sweep``/``run_sweep`` (runner.py) validate and
train them; ``build_leaderboard``/``write_leaderboard`` (leaderboard.py) summarise them with
``summarize``/``compare`` (stats.py); ``sweep_preset`` (presets.py) names the seed papers' sweeps.
"""

from moelab.sweep.fairness import FairnessReport, check_fairness
from moelab.sweep.leaderboard import Leaderboard, build_leaderboard, write_leaderboard
from moelab.sweep.presets import SWEEP_PRESETS, sweep_preset
from moelab.sweep.runner import SweepPlan, SweepResult, plan_sweep, run_sweep
from moelab.sweep.spec import RunSpec, SweepSpec
from moelab.sweep.stats import Comparison, Summary, compare, summarize

__all__ = [
    "Comparison", "FairnessReport", "Leaderboard", "RunSpec", "SWEEP_PRESETS", "Summary", "SweepPlan",
    "SweepResult", "SweepSpec", "build_leaderboard", "check_fairness", "compare", "plan_sweep", "run_sweep",
    "summarize", "sweep_preset", "write_leaderboard",
]
