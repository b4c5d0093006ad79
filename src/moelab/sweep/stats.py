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


# --------------------------------------------------------------------------- paired designs


def paired_compare(a_values, b_values, *, margin: float, alpha: float = 0.05) -> Comparison:
    """Paired comparison of two configurations run with the same seeds (common random numbers).

    ``a_values[i]`` and ``b_values[i]`` share seed i (the same data order and the same initial
    weights for every parameter they share), so the per-seed differences ``d_i = a_i - b_i`` carry
    the configurations' difference without most of the seed-to-seed variation. The interval is
    the Student-t interval of mean(d) with n-1 degrees of freedom (``1 - 2α`` for the TOST, as in
    :func:`compare`); the difference test is the paired t-test; equivalence is the paired TOST.
    """
    a = np.asarray(list(a_values), dtype=float)
    b = np.asarray(list(b_values), dtype=float)
    if a.shape != b.shape:
        raise MoelabError(f"paired_compare needs the same seeds on both sides (got {a.size} and {b.size} values)")
    if a.size < 2:
        raise MoelabError(f"paired_compare needs >= 2 paired seeds (got {a.size})")
    if margin <= 0:
        raise MoelabError(f"margin={margin} must be > 0")
    d = a - b
    diff = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(d.size)
    if se == 0:
        p_eq = 0.0 if abs(diff) < margin else 1.0
        return Comparison(diff, diff, diff, 0.0 if diff != 0 else 1.0, p_eq, margin, alpha)
    df = d.size - 1
    t_crit = float(_st.t.ppf(1 - alpha, df))
    p_diff = float(2 * _st.t.sf(abs(diff) / se, df))
    p_lower = float(_st.t.sf((diff + margin) / se, df))
    p_upper = float(_st.t.cdf((diff - margin) / se, df))
    return Comparison(diff, diff - t_crit * se, diff + t_crit * se, p_diff, max(p_lower, p_upper), margin, alpha)


def signed_rank_p(a_values, b_values) -> float:
    """Two-sided Wilcoxon signed-rank p-value of the paired differences (exact for small n): a
    check on the paired t-test that does not assume normal differences. NaN when every difference
    is zero. With n <= 5 seeds it can never go below 0.0625: report it, do not decide on it."""
    d = np.asarray(list(a_values), dtype=float) - np.asarray(list(b_values), dtype=float)
    if d.size < 1 or not np.any(d != 0):
        return float("nan")
    return float(_st.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def seeds_needed(diff: float, sd: float, *, margin: float, alpha: float = 0.05, power: float = 0.8,
                 max_n: int = 10_000) -> int | None:
    """Seeds (pairs, or per group for an unpaired design with ``sd`` its per-group pooled sd times
    sqrt(2)) after which the comparison is expected to be conclusive at ``alpha`` with ``power``.

    Assumes the observed ``diff`` and ``sd`` (of one paired difference) are the truth. Two ways to
    become conclusive: *different* (two-sided t-test, effect |diff|) or *equivalent* (TOST at
    ``margin``). Returns the smaller n (>= 2) whose noncentral-t power reaches ``power`` for either, or None when neither is reachable within ``max_n`` (e.g. |diff|
    equals the margin exactly). ``sd == 0`` needs 2 seeds.
    """
    if sd < 0 or not math.isfinite(sd) or not math.isfinite(diff):
        raise MoelabError(f"seeds_needed needs a finite diff and sd >= 0 (got diff={diff}, sd={sd})")
    if sd == 0:
        return 2
    best = None
    for test in ("difference", "equivalence"):
        if test == "difference" and diff == 0 or test == "equivalence" and abs(diff) >= margin:
            continue
        n = _n_for_power((abs(diff) / sd, margin / sd), alpha, power, test, max_n)
        if n is not None and (best is None or n < best):
            best = n
    return best


def _power(n: int, es: tuple[float, float], alpha: float, test: str) -> float:
    """Power at n seeds; ``es`` = (|diff|, margin) in units of sd. Difference: the two-sided t-test's
    noncentral-t power. Equivalence: TOST power bounded below by P(lower rejects) + P(upper
    rejects) - 1 (both one-sided tests must reject; the bound is conservative, so n is too)."""
    d, m = es
    df, root = n - 1, math.sqrt(n)
    if test == "difference":
        t = _st.t.ppf(1 - alpha / 2, df)
        return float(_st.nct.sf(t, df, d * root) + _st.nct.cdf(-t, df, d * root))
    t = _st.t.ppf(1 - alpha, df)
    return float(_st.nct.sf(t, df, (m - d) * root) + _st.nct.sf(t, df, (m + d) * root) - 1)


def _n_for_power(es: tuple[float, float], alpha: float, power: float, test: str, max_n: int) -> int | None:
    lo, hi = 2, 2
    while _power(hi, es, alpha, test) < power:
        if hi >= max_n:
            return None
        lo, hi = hi, min(hi * 2, max_n)
    while lo < hi:  # smallest n in [lo, hi] with enough power (power grows with n)
        mid = (lo + hi) // 2
        if _power(mid, es, alpha, test) >= power:
            hi = mid
        else:
            lo = mid + 1
    return hi
