"""Sweeps: a base config plus axes × seeds, run resumably and fairly, summarised with statistics.

``SweepSpec`` (spec.py) expands into runs; ``plan_sweep``/``run_sweep`` (runner.py) validate and
train them; ``build_leaderboard``/``write_leaderboard`` (leaderboard.py) summarise them with
``summarize``/``compare`` (stats.py); ``sweep_preset`` (presets.py) names the seed papers' sweeps.
"""

# Names resolve lazily (moelab._lazy): the CLI reads the presets without importing the runner.
from moelab._lazy import lazy_exports as _lazy_exports

_EXPORTS = {
    "FairnessReport": "moelab.sweep.fairness",
    "check_fairness": "moelab.sweep.fairness",
    "Leaderboard": "moelab.sweep.leaderboard",
    "build_leaderboard": "moelab.sweep.leaderboard",
    "write_leaderboard": "moelab.sweep.leaderboard",
    "SWEEP_PRESETS": "moelab.sweep.presets",
    "sweep_preset": "moelab.sweep.presets",
    "SweepPlan": "moelab.sweep.runner",
    "SweepResult": "moelab.sweep.runner",
    "plan_sweep": "moelab.sweep.runner",
    "run_sweep": "moelab.sweep.runner",
    "RunSpec": "moelab.sweep.spec",
    "SweepSpec": "moelab.sweep.spec",
    "Comparison": "moelab.sweep.stats",
    "Summary": "moelab.sweep.stats",
    "compare": "moelab.sweep.stats",
    "summarize": "moelab.sweep.stats",
}
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, module_globals=globals())

__all__ = [
    "Comparison", "FairnessReport", "Leaderboard", "RunSpec", "SWEEP_PRESETS", "Summary", "SweepPlan",
    "SweepResult", "SweepSpec", "build_leaderboard", "check_fairness", "compare", "plan_sweep", "run_sweep",
    "summarize", "sweep_preset", "write_leaderboard",
]
