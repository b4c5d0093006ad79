"""Statistics for comparing configurations across seeds.

Group summaries use the Student-t 95% interval of the mean. Pairwise comparisons use Welch's
t-interval for the difference of means and the two one-sided tests (TOST) procedure for
equivalence (Schuirmann 1987), as the Equifinality study does for its controlled router
comparisons: A and B are *equivalent within margin δ* when both one-sided nulls
``diff <= -δ`` and ``diff >= δ`` are rejected at level α, i.e. when the (1-2α) confidence
interval of the difference lies inside (-δ, δ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as _st

from moelab.errors import MoelabError


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2


def summarize(values, confidence: float = 0.95) -> Summary:
    """Mean with a Student-t interval; a single value has NaN bounds (no spread to estimate)."""
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        raise MoelabError("summarize needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return Summary(1, mean, float("nan"), float("nan"), float("nan"))
    std = float(x.std(ddof=1))
    h = float(_st.t.ppf(0.5 + confidence / 2, x.size - 1)) * std / math.sqrt(x.size)
    return Summary(int(x.size), mean, std, mean - h, mean + h)


@dataclass(frozen=True)
class Comparison:
    diff: float  # mean(a) - mean(b)
    ci_low: float
    ci_high: float
    p_difference: float  # two-sided Welch test of equal means
    p_equivalence: float  # TOST p-value (max of the two one-sided p-values)
    margin: float
    alpha: float

    @property
    def equivalent(self) -> bool:
        return self.p_equivalence < self.alpha

    @property
    def different(self) -> bool:
        return self.p_difference < self.alpha

    def verdict(self, lower_is_better: bool = True, names: tuple[str, str] = ("A", "B")) -> str:
        a, b = names
        if self.equivalent:
            return f"{a} ≈ {b} (equivalent within ±{self.margin:g})"
        if self.different:
            a_better = (self.diff < 0) == lower_is_better
            return f"{a if a_better else b} is better"
        return "inconclusive"


def _welch(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Standard error of mean(a)-mean(b) and Welch–Satterthwaite degrees of freedom."""
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return 0.0, float("inf")
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    return se, df


def compare(a_values, b_values, *, margin: float, alpha: float = 0.05) -> Comparison:
    """Difference of means with a (1-2α) interval, Welch's test and TOST at ``margin``."""
    a = np.asarray(list(a_values), dtype=float)
    b = np.asarray(list(b_values), dtype=float)
    if a.size < 2 or b.size < 2:
        raise MoelabError(f"compare needs >= 2 seeds per group (got {a.size} and {b.size})")
    if margin <= 0:
        raise MoelabError(f"margin={margin} must be > 0")
    diff = float(a.mean() - b.mean())
    se, df = _welch(a, b)
    if se == 0:  # no spread at all: decide exactly
        p_diff = 0.0 if diff != 0 else 1.0
        p_eq = 0.0 if abs(diff) < margin else 1.0
        return Comparison(diff, diff, diff, p_diff, p_eq, margin, alpha)
    t_crit = float(_st.t.ppf(1 - alpha, df))
    p_diff = float(2 * _st.t.sf(abs(diff) / se, df))
    p_lower = float(_st.t.sf((diff + margin) / se, df))  # H0: diff <= -margin
    p_upper = float(_st.t.cdf((diff - margin) / se, df))  # H0: diff >= +margin
    return Comparison(diff, diff - t_crit * se, diff + t_crit * se, p_diff, max(p_lower, p_upper), margin, alpha)
