"""Health checks the trainer runs every step: divergence (non-finite loss or gradient norm, a loss
worse than uniform guessing) and routing collapse (a layer whose load stays near its maximum, or
experts that get no tokens).

Choices (ours; no paper prescribes them):

* Non-finite: the loss and the global gradient norm are checked before the optimizer step, so the
  weights never take a NaN/inf update. ``train.on_nonfinite="stop"`` raises :class:`TrainingDiverged`
  naming the step; ``"skip"`` drops the step's update (like a loss scaler skipping an overflowed
  step) and stops after ``train.max_skipped_steps`` consecutive skips.
* Loss above uniform: a language model that predicts uniformly over the vocabulary has loss
  ``ln(vocab_size)``; a training loss above ``ln(V) + 1`` nats is worse than knowing nothing, the
  signature of a too-high learning rate (measured: lr 1.0 on ``tiny`` goes to 13-17 nats with
  ``ln 4096 = 8.3``). Warned once per run session.
* Collapse: the max/mean of a layer's expert loads is at most ``E/k`` (all tokens on k experts);
  a layer warns when it stays at or above ``collapse_ratio * E/k`` for ``collapse_window``
  consecutive steps, or when some expert got no token in each of those steps. One warning per
  episode (it re-arms when the layer recovers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from moelab.errors import MoelabError


class TrainingDiverged(MoelabError):
    """The loss or the gradient norm became non-finite (the message names the step)."""


def is_finite(x: float | None) -> bool:
    return x is None or math.isfinite(x)


def nonfinite_message(step: int, loss: float, grad_norm: float | None, lr: float) -> str:
    return (f"training diverged at step {step}: loss={loss!r}, grad_norm={grad_norm!r} (lr={lr:.4g}); "
            "no update was applied and no checkpoint was written for this step. Lower train.lr or raise "
            "train.warmup_steps, and resume from the last checkpoint (--resume); train.on_nonfinite=skip "
            "skips such steps instead")


def above_uniform_message(step: int, loss: float, vocab_size: int) -> str:
    return (f"warning: training loss {loss:.3f} at step {step} is above ln(vocab_size)={math.log(vocab_size):.3f} "
            "+ 1, worse than uniform guessing: the run is diverging (lower train.lr)")


@dataclass
class CollapseMonitor:
    """Per-layer streaks of near-maximal load and of experts without tokens (see the module doc)."""

    window: int
    ratio: float = 0.9
    _high: dict[int, int] = field(default_factory=dict)
    _dead: dict[int, list[int]] = field(default_factory=dict)
    _warned: dict[int, bool] = field(default_factory=dict)

    def update(self, step: int, layers: list[tuple[int, dict[str, Any], int | None]]) -> list[str]:
        """Feed one step's ``[(layer index, routing_stats, k)]``; return the warnings of this step."""
        if self.window <= 0:
            return []
        out = []
        for index, stats, k in layers:
            msg = self._layer(step, index, stats, k)
            if msg:
                out.append(msg)
        return out

    def _layer(self, step: int, index: int, stats: dict[str, Any], k: int | None) -> str | None:
        counts = stats.get("counts")
        if not counts or not sum(counts):
            return None
        E, total = len(counts), sum(counts)
        mom = max(counts) / (total / E)
        bound = E / k if k else None
        high = bound is not None and bound > 1 and mom >= self.ratio * bound
        self._high[index] = self._high.get(index, 0) + 1 if high else 0
        dead = self._dead.setdefault(index, [0] * E)
        if len(dead) != E:
            dead[:] = [0] * E
        for e, c in enumerate(counts):
            dead[e] = dead[e] + 1 if c == 0 else 0
        starved = [e for e, n in enumerate(dead) if n >= self.window]
        collapsed = self._high[index] >= self.window or bool(starved)
        if not collapsed:
            self._warned[index] = False
            return None
        if self._warned.get(index):
            return None
        self._warned[index] = True
        return self._message(step, index, counts, mom, bound, starved, self._high[index])

    def _message(self, step, index, counts, mom, bound, starved, high_streak) -> str:
        total = sum(counts)
        top = sorted(range(len(counts)), key=lambda e: -counts[e])[:2]
        share = ", ".join(f"expert {e} {100 * counts[e] / total:.1f}%" for e in top)
        parts = [f"load max/mean {mom:.2f}" + (f" (maximum E/k = {bound:.2f})" if bound else "")
                 + (f" for {high_streak} steps" if high_streak >= self.window else "")]
        if starved:
            parts.append(f"{len(starved)} of {len(counts)} experts got no tokens for {self.window} steps "
                         f"(experts {starved})")
        return (f"warning: routing collapse in layer {index} at step {step}: {'; '.join(parts)}; "
                f"share of routed slots: {share}")
