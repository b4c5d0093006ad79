"""Cost–quality metrics for model routers.

- AIQ (RouterBench, arXiv:2403.12031, §4): area under the non-decreasing convex hull of a router's
  (cost, quality) points over the cost range ``[c_lo, c_hi]`` (the cheapest and the most expensive
  single model), divided by ``c_hi - c_lo``. Mixing two operating points at random realises every
  point on the hull, hence the hull. Choice: outside the router's own cost span the hull is
  extended flat, so a single model's AIQ is its quality. In evaluation (``evaluate.py``) the
  single models' points are added to every router's hull, RouterBench's "zero router".
- APGR and CPT(x%) (RouteLLM, arXiv:2406.18665, §5.1): quality against the fraction of calls to the
  strong model; PGR(f) = (q(f) - q_weak) / (q_strong - q_weak); CPT(x) = the smallest strong-call
  fraction with PGR >= x. Two conventions for APGR, both reported:

  * ``apgr`` (moelab's): ∫_0^1 PGR(f) df over the whole [0, 1] range (trapezoids over the swept
    points, extended flat outside them), so a router that never reaches 100% strong calls keeps
    its last quality there.
  * ``apgr_routellm`` (RouteLLM's ``evals/evaluate.py``): ``np.trapz`` of quality over the swept
    points only, divided by the weak and strong models' areas over the same span
    [f_min, f_max]; i.e. the mean PGR over the span the router reaches. Equal to ``apgr`` when the
    sweep spans 0-100% strong calls; otherwise they differ (e.g. 0.551 vs 0.489 for a kNN router).

- AIQ, two conventions, both reported: ``aiq`` adds the single models' points to the router's hull
  (RouterBench's zero router: any mix with single models is realisable), so a router worse than
  mixing single models scores exactly what the zero router scores; ``aiq_own_points`` uses the
  router's own points only: flat above its dearest point (a larger budget may go unspent), zero
  below its cheapest (no operating point is that cheap), so such a router scores below it.
- Arena score (RouterArena, arXiv:2510.00202): (1 + β)·A·C / (β·A + C), β = 0.1, with
  C = (log2 c_max − log2 c) / (log2 c_max − log2 c_min), c in USD per 1k queries, c_max = 200,
  c_min = 0.0044 (C clipped to [0, 1]).
"""

from __future__ import annotations

import numpy as np

from moelab.errors import MoelabError


def nondecreasing_hull(cost_K: np.ndarray, q_K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the upper convex hull of the points, cut after its highest point (so it is
    non-decreasing in cost). Returns ``(cost_H, q_H)`` sorted by cost."""
    cost_K, q_K = np.asarray(cost_K, float), np.asarray(q_K, float)
    if len(cost_K) == 0:
        raise MoelabError("a cost–quality curve needs at least one point")
    order = np.lexsort((-q_K, cost_K))
    pts = []
    for c, q in zip(cost_K[order], q_K[order]):
        if pts and pts[-1][0] == c:
            continue  # same cost: the first (highest quality) wins
        while len(pts) >= 2:
            (c1, q1), (c2, q2) = pts[-2], pts[-1]
            if (q2 - q1) * (c - c1) <= (q - q1) * (c2 - c1):  # middle point under the chord
                pts.pop()
            else:
                break
        pts.append((c, q))
    hc = np.array([p[0] for p in pts])
    hq = np.array([p[1] for p in pts])
    top = int(np.argmax(hq))
    return hc[: top + 1], hq[: top + 1]


def hull_value(cost_H: np.ndarray, q_H: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Quality of the hull at costs ``x`` (flat outside its span)."""
    return np.interp(x, cost_H, q_H)


def _area(xs: np.ndarray, ys: np.ndarray, lo: float, hi: float) -> float:
    """Exact integral over [lo, hi] of the piecewise-linear function through (xs, ys), flat outside."""
    grid = np.unique(np.concatenate([[lo, hi], xs[(xs > lo) & (xs < hi)]]))
    vals = np.interp(grid, xs, ys)
    return float(np.sum((grid[1:] - grid[:-1]) * (vals[1:] + vals[:-1]) / 2))


def aiq(cost_K, q_K, c_lo: float, c_hi: float, below: str = "flat") -> float:
    """RouterBench's AIQ (see module docstring). ``below``: the hull's value at costs under its
    cheapest point: ``"flat"`` (that point's quality) or ``"zero"`` (nothing is achievable for less
    than the cheapest operating point; used for ``aiq_own_points``)."""
    hc, hq = nondecreasing_hull(cost_K, q_K)
    if c_hi <= c_lo:
        return float(hull_value(hc, hq, np.array([c_lo]))[0])
    if below == "zero" and hc[0] > c_lo:
        hc, hq = np.concatenate([[c_lo, hc[0] * (1 - 1e-12)], hc]), np.concatenate([[0.0, 0.0], hq])
    return _area(hc, hq, c_lo, c_hi) / (c_hi - c_lo)


def _frac_curve(frac_K, q_K):
    frac_K, q_K = np.asarray(frac_K, float), np.asarray(q_K, float)
    xs = np.unique(frac_K)
    ys = np.array([q_K[frac_K == x].max() for x in xs])
    return xs, ys


def apgr(frac_K, q_K, q_weak: float, q_strong: float) -> float:
    """RouteLLM's average performance gap recovered (see module docstring)."""
    if q_strong == q_weak:
        return float("nan")
    xs, ys = _frac_curve(frac_K, q_K)
    return (_area(xs, ys, 0.0, 1.0) - q_weak) / (q_strong - q_weak)


def apgr_routellm(frac_K, q_K, q_weak: float, q_strong: float) -> float:
    """RouteLLM's APGR exactly as ``routellm/evals/evaluate.py`` computes it: trapezoids over the
    swept points sorted by strong-call fraction, normalised by the weak/strong areas over the same
    span. Choice: points sharing a fraction keep the best quality (RouteLLM's sort leaves their
    order unspecified). NaN if the sweep has a single fraction or the models tie."""
    if q_strong == q_weak:
        return float("nan")
    xs, ys = _frac_curve(frac_K, q_K)
    if len(xs) < 2:
        return float("nan")
    span = xs[-1] - xs[0]
    auc = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))
    return (auc - q_weak * span) / ((q_strong - q_weak) * span)


def cpt(frac_K, q_K, q_weak: float, q_strong: float, target: float) -> float:
    """RouteLLM's call-performance threshold: smallest strong-call fraction reaching PGR >= target
    on the piecewise-linear curve (NaN if never reached)."""
    if q_strong == q_weak:
        return float("nan")
    xs, ys = _frac_curve(frac_K, q_K)
    if len(xs) == 1 or xs[0] > 0:
        xs, ys = np.concatenate([[0.0], xs]), np.concatenate([[ys[0]], ys])
    pgr = (ys - q_weak) / (q_strong - q_weak)
    for i in range(len(xs)):
        if pgr[i] >= target - 1e-12:
            if i == 0:
                return float(xs[0])
            x0, x1, p0, p1 = xs[i - 1], xs[i], pgr[i - 1], pgr[i]
            return float(x0 + (target - p0) / (p1 - p0) * (x1 - x0))
    return float("nan")


def arena_score(accuracy: float, cost_per_query: float, beta: float = 0.1,
                c_max: float = 200.0, c_min: float = 0.0044) -> float:
    """RouterArena's score (accuracy in [0, 1], cost in USD per query); returns [0, 1]."""
    c = max(cost_per_query * 1000.0, 1e-300)
    C = float(np.clip((np.log2(c_max) - np.log2(c)) / (np.log2(c_max) - np.log2(c_min)), 0.0, 1.0))
    A = float(accuracy)
    if A == 0 and C == 0:
        return 0.0
    return (1 + beta) * A * C / (beta * A + C)


def quality_at_budget(cost_K, q_K, budget: float) -> float:
    """Best quality among operating points whose mean cost is within ``budget`` (NaN if none)."""
    cost_K, q_K = np.asarray(cost_K, float), np.asarray(q_K, float)
    ok = cost_K <= budget * (1 + 1e-9)
    return float(q_K[ok].max()) if ok.any() else float("nan")
