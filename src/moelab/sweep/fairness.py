"""Fairness of a comparison: what must be equal across the runs of a sweep.

A comparison of configurations is only evidence when the runs differ in the compared choice and
nothing else that matters. :func:`check_fairness` checks, over every run:

* **equal token budget**: ``train.steps * train.batch_size * train.grad_accum * data.seq_len``;
* **equal active parameters per token**, within a relative tolerance (``max/min - 1 <= tolerance``;
  spec ``fairness.active_param_tolerance``, default 0.05: router parameters differ a little between
  routers; an MoE with 2x the active experts does not pass);
* **same data order and evaluation tokens**: the whole ``data`` section (corpus, split, tokenizer,
  ``data.seed``, which fixes the order of the training stream) and the evaluation settings
  (``train.eval_max_batches``, ``train.eval_batch_size``) are identical; only ``train.seed`` (the
  model initialisation) varies across the seeds of a configuration.

The report states every run's budget and active parameters; an unfair sweep is refused unless the
user says otherwise (``--allow-unfair`` / spec ``fairness.allow_unfair``), and then the leaderboard
carries the warning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

EVAL_KEYS = ("eval_max_batches", "eval_batch_size")


@dataclass
class FairnessReport:
    tolerance: float
    token_budget: dict[str, int]  # group -> tokens
    active_params: dict[str, int]  # group -> active parameters per token
    issues: list[str] = field(default_factory=list)

    @property
    def fair(self) -> bool:
        return not self.issues

    @property
    def active_spread(self) -> float:
        """max/min - 1 of the active parameters over groups (0.0 when all equal)."""
        vals = [v for v in self.active_params.values() if v]
        return max(vals) / min(vals) - 1.0 if vals else 0.0

    def describe(self) -> str:
        budgets = sorted(set(self.token_budget.values()))
        head = (f"fairness: token budget {', '.join(f'{b:,}' for b in budgets)} tokens; active parameters "
                f"{min(self.active_params.values(), default=0):,}..{max(self.active_params.values(), default=0):,} "
                f"(spread {self.active_spread:.1%}, tolerance {self.tolerance:.1%})")
        if self.fair:
            return head + "; same data, data order and evaluation tokens: fair"
        return head + "\nUNFAIR:\n" + "\n".join(f"  - {i}" for i in self.issues)

    def refusal(self) -> str:
        return ("refusing to compare unfair runs:\n" + "\n".join(f"  - {i}" for i in self.issues)
                + "\npass --allow-unfair (or set fairness.allow_unfair = true, or raise "
                  "fairness.active_param_tolerance in the spec) to run and compare them anyway")

    def to_dict(self) -> dict[str, Any]:
        return {"fair": self.fair, "tolerance": self.tolerance, "active_spread": self.active_spread,
                "token_budget": self.token_budget, "active_params": self.active_params, "issues": self.issues}


def token_budget(config: dict[str, Any]) -> int:
    t, d = config["train"], config["data"]
    return int(t["steps"]) * int(t["batch_size"]) * int(t.get("grad_accum", 1)) * int(d["seq_len"])


def check_fairness(runs: list[tuple[str, str, dict[str, Any], int]], *, tolerance: float = 0.05) -> FairnessReport:
    """Fairness of ``runs`` given as (name, group, RunConfig dict, active parameters) tuples."""
    budgets: dict[str, int] = {}
    active: dict[str, int] = {}
    issues: list[str] = []
    for _, group, cfg, n_active in runs:
        budgets.setdefault(group, token_budget(cfg))
        active.setdefault(group, int(n_active))
    if len(set(budgets.values())) > 1:
        issues.append("token budgets differ (steps x batch x grad_accum x seq_len): "
                      + ", ".join(f"{g}={b:,}" for g, b in sorted(budgets.items(), key=lambda x: x[1])))
    vals = [v for v in active.values() if v]
    if vals and max(vals) > (1.0 + tolerance) * min(vals):
        lo = min(active, key=active.get)
        hi = max(active, key=active.get)
        issues.append(f"active parameters per token differ by {max(vals) / min(vals) - 1:.1%} > tolerance "
                      f"{tolerance:.1%}: {lo}={active[lo]:,} vs {hi}={active[hi]:,}")
    first_name, _, first, _ = runs[0] if runs else ("", "", {}, 0)
    for name, _, cfg, _ in runs[1:]:
        if _canon(cfg.get("data")) != _canon(first.get("data")):
            keys = [k for k in sorted(set(cfg["data"]) | set(first["data"])) if cfg["data"].get(k) != first["data"].get(k)]
            issues.append(f"data differs between {first_name} and {name} (data.{', data.'.join(keys)}): "
                          "different data, data order or evaluation tokens")
            break
    for name, _, cfg, _ in runs[1:]:
        diff = [k for k in EVAL_KEYS if cfg["train"].get(k) != first["train"].get(k)]
        if diff:
            issues.append(f"evaluation settings differ between {first_name} and {name} (train.{', train.'.join(diff)})")
            break
    return FairnessReport(tolerance, budgets, active, issues)


def _canon(d: Any) -> str:
    return json.dumps(d, sort_keys=True, default=str)
