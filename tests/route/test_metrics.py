"""Metrics on hand-built curves and matrices, checked against plain-loop oracles."""

import numpy as np
import pytest

from moelab.route import metrics as mt
from moelab.route.base import build_router
from moelab.route.data import RoutingDataset
from moelab.route.evaluate import evaluate_sweep, sweep
from moelab.route.features import TfidfSvdFeaturizer


def _brute_hull_value(c, q, x):
    """Best quality reachable at cost <= x by mixing any two points (or one), flat extension."""
    best = -np.inf
    pts = list(zip(c, q))
    for (c1, q1) in pts:
        if c1 <= x:
            best = max(best, q1)
        for (c2, q2) in pts:
            if c1 < x < c2:
                t = (x - c1) / (c2 - c1)
                best = max(best, (1 - t) * q1 + t * q2)
    if best == -np.inf:  # left of every point: flat extension at the cheapest point's best quality
        cmin = min(c)
        best = max(qq for cc, qq in pts if cc == cmin)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hull_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    c, q = rng.random(12), rng.random(12)
    hc, hq = mt.nondecreasing_hull(c, q)
    assert np.all(np.diff(hq) >= -1e-12) and np.all(np.diff(hc) > 0)
    for x in np.linspace(-0.1, 1.1, 57):
        assert mt.hull_value(hc, hq, np.array([x]))[0] == pytest.approx(_brute_hull_value(c, q, x), abs=1e-9)


def test_aiq_single_model_is_its_point():
    assert mt.aiq([0.3], [0.7], 0.1, 0.9) == pytest.approx(0.7)


def test_aiq_against_numeric_integral():
    rng = np.random.default_rng(3)
    c, q = rng.random(8), rng.random(8)
    xs = np.linspace(0.05, 0.95, 20001)
    hc, hq = mt.nondecreasing_hull(c, q)
    ref = np.trapezoid(mt.hull_value(hc, hq, xs), xs) / 0.9
    assert mt.aiq(c, q, 0.05, 0.95) == pytest.approx(ref, abs=1e-6)


def _two_model_matrix(seed=0, n=400):
    rng = np.random.default_rng(seed)
    weak = (rng.random(n) < 0.5).astype(float)
    strong = np.maximum(weak, (rng.random(n) < 0.6).astype(float))
    strong[rng.random(n) < 0.05] = 0.0  # a few prompts only the weak model gets right
    costs = np.stack([np.full(n, 1e-4), np.full(n, 1e-3)], 1)
    return RoutingDataset("hand", [f"p{i}" for i in range(n)], [f"text {i}" for i in range(n)],
                          ["s"] * n, ["a" if i % 2 else "b" for i in range(n)], ["weak", "strong"],
                          np.stack([weak, strong], 1), costs)


def test_apgr_weak_zero_strong_one_oracle_closed_form():
    ds = _two_model_matrix()
    ds_weak_only = build_router("cheapest").fit(ds)
    m_weak = evaluate_sweep(sweep(ds_weak_only, ds), ds, n_boot=0)["metrics"]
    m_strong = evaluate_sweep(sweep(build_router("best-single").fit(ds), ds), ds, n_boot=0)["metrics"]
    assert m_weak["apgr"] == pytest.approx(0.0)
    assert m_strong["apgr"] == pytest.approx(1.0)
    # Oracle: strong only where strong is right and weak wrong (fraction f*); its curve rises
    # linearly from (0, q_weak) to (f*, q_oracle) and stays flat: APGR = PGR_o * (1 - f*/2).
    s = ds.scores_PM
    need = (s[:, 1] > s[:, 0])
    f_star = need.mean()
    q_o, q_w, q_s = s.max(1).mean(), s[:, 0].mean(), s[:, 1].mean()
    pgr_o = (q_o - q_w) / (q_s - q_w)
    m_or = evaluate_sweep(sweep(build_router("oracle").fit(ds), ds), ds, n_boot=0)["metrics"]
    assert m_or["apgr"] == pytest.approx(pgr_o * (1 - f_star / 2), rel=1e-6)
    # CPT(50%) of the oracle: PGR reaches 0.5 at f*/(2 * PGR_o)
    assert m_or["cpt50"] == pytest.approx(f_star * 0.5 / pgr_o, rel=1e-6)


def test_oracle_curve_dominates_every_router():
    ds = _two_model_matrix(seed=1)
    o = sweep(build_router("oracle").fit(ds), ds)
    hc, hq = mt.nondecreasing_hull(o.cost_KP.mean(1), o.quality_KP.mean(1))
    feat = TfidfSvdFeaturizer(dim=16).fit(ds.require_texts())
    for name in ["random", "best-single", "cheapest", "knn", "linear", "carrot", "threshold", "cascade"]:
        sw = sweep(build_router(name).fit(ds, featurizer=feat), ds)
        c, q = sw.cost_KP.mean(1), sw.quality_KP.mean(1)
        assert np.all(q <= mt.hull_value(hc, hq, c) + 1e-9), name


def test_arena_score_formula():
    A, cost = 0.6, 0.002  # USD per query -> 2 USD per 1k
    C = (np.log2(200) - np.log2(2.0)) / (np.log2(200) - np.log2(0.0044))
    assert mt.arena_score(A, cost) == pytest.approx(1.1 * A * C / (0.1 * A + C))
    assert mt.arena_score(1.0, 0.0044 / 1000) == pytest.approx(1.0)


def test_quality_at_budget_picks_best_affordable_point():
    assert mt.quality_at_budget([1, 2, 3], [0.5, 0.7, 0.9], 2.5) == 0.7
    assert np.isnan(mt.quality_at_budget([1, 2], [0.5, 0.7], 0.5))


def test_bootstrap_ci_contains_point_estimate():
    ds = _two_model_matrix(seed=2)
    r = build_router("knn").fit(ds)
    res = evaluate_sweep(sweep(r, ds), ds, n_boot=50)
    lo, hi = res["ci95"]["aiq"]
    assert lo <= res["metrics"]["aiq"] <= hi and lo < hi


def test_aiq_of_a_one_model_pool_is_its_quality():
    n = 50
    s = (np.arange(n) % 3 == 0).astype(float)[:, None]
    ds = RoutingDataset("one", [f"p{i}" for i in range(n)], [f"t {i}" for i in range(n)], ["s"] * n, ["c"] * n,
                        ["only"], s, np.full((n, 1), 2e-4))
    m = evaluate_sweep(sweep(build_router("best-single").fit(ds), ds), ds, n_boot=0)["metrics"]
    assert m["aiq"] == pytest.approx(s.mean())
