"""The SW-ranking and IRT routers against independent oracles."""

import math

import numpy as np
import pytest

from moelab.route import build_router
from moelab.route.data import RoutingDataset
from moelab.route.routers.sw_ranking import bt_mle


def _ds(n=40, M=3, seed=0):
    rng = np.random.default_rng(seed)
    s = (rng.random((n, M)) < np.linspace(0.3, 0.8, M)).astype(float)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    ds = RoutingDataset("t", [f"p{i}" for i in range(n)], [f"t{i}" for i in range(n)], ["s"] * n, ["c"] * n,
                        [f"m{j}" for j in range(M)], s, np.tile(np.arange(1, M + 1) * 1e-3, (n, 1)))
    return ds, x


def test_sw_ranking_equals_routellm_weighted_elo_fit():
    """Oracle: RouteLLM's compute_elo_mle_with_tie construction (battles duplicated, a tie = one win
    each way, unpenalised logistic regression with the similarity weights), fitted by sklearn."""
    from sklearn.linear_model import LogisticRegression

    ds, x = _ds()
    prior = 1.0
    r = build_router("sw-ranking", prior=prior).fit(ds, x_ND=x)
    q = np.random.default_rng(1).normal(size=(1, 6)).astype(np.float32)
    w_N = r.weights(q)[0]
    sims = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (q[0] / np.linalg.norm(q[0]))
    np.testing.assert_allclose(w_N, 10 * 10 ** (sims / sims.max()), rtol=1e-4)  # get_weightings
    M = 3
    rows, ys, ws = [], [], []
    battles = [(n, a, b, w_N[n]) for n in range(len(x)) for a in range(M) for b in range(a + 1, M)]
    battles += [(None, a, b, prior) for a in range(M) for b in range(a + 1, M)]  # prior: one tie per pair
    for n, a, b, w in battles:
        sa, sb = (ds.scores_PM[n, a], ds.scores_PM[n, b]) if n is not None else (0, 0)
        for copy in (0, 1):
            xr = np.zeros(M)
            xr[a], xr[b] = 1.0, -1.0
            y = 1.0 if sa > sb else (0.0 if sa < sb else (1.0 if copy == 0 else 0.0))
            rows.append(xr), ys.append(y), ws.append(w)
    lr = LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-10, max_iter=10000)  # no penalty
    lr.fit(np.array(rows), np.array(ys), sample_weight=np.array(ws))
    th = lr.coef_[0]
    p_ref = 1 / (1 + np.exp(-(th[:, None] - th[None, :])))
    np.testing.assert_allclose(r.win_prob(q)[0], p_ref, atol=1e-4)


def test_bt_mle_recovers_known_strengths():
    th = np.array([0.8, 0.0, -0.8])
    p = 1 / (1 + np.exp(-(th[:, None] - th[None, :])))
    w = 1000 * p * (1 - np.eye(3))  # expected win counts of 1000 battles per ordered pair
    np.testing.assert_allclose(bt_mle(w[None])[0], th - th.mean(), atol=1e-6)


def test_irt_probability_by_hand():
    ds, x = _ds(seed=2)
    r = build_router("irt", epochs=3, dim=2).fit(ds, x_ND=x)
    q, _ = r.estimate(None, x_PD=x[:3])
    w = r._w
    for p in range(3):
        for m in range(3):
            z = 0.0
            for k in range(2):  # a_k(x) = softplus(Wa x + ba), theta_mk
                ak = sum(w["irt.a.weight"][k, d] * float(x[p, d]) for d in range(6)) + w["irt.a.bias"][k]
                z += math.log1p(math.exp(ak)) * w["irt.theta.weight"][m, k]
            b = sum(w["irt.b.weight"][0, d] * float(x[p, d]) for d in range(6)) + w["irt.b.bias"][0]
            assert q[p, m] == pytest.approx(1 / (1 + math.exp(-(z - b))), rel=1e-4)
