"""Routing metrics on constructed routings whose answers are known by hand, plus loop oracles."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from moelab.analysis import metrics as M
from moelab.errors import MoelabError


def topk_slots(idx_TK):
    idx_TK = np.asarray(idx_TK)
    T, K = idx_TK.shape
    return np.repeat(np.arange(T), K), idx_TK.reshape(-1)


# ----------------------------------------------------------------- balance
def test_perfect_balance():
    E, T = 4, 8
    tok, exp = topk_slots([[t % E, (t + 1) % E] for t in range(T)])
    c = M.expert_counts(exp, E)
    assert c.tolist() == [4, 4, 4, 4]
    b = M.load_balance(c)
    assert b["max_over_mean"] == pytest.approx(1.0)
    assert b["cv"] == pytest.approx(0.0)
    assert b["unused"] == 0


def test_all_to_one_expert():
    E, T = 5, 10
    c = M.expert_counts(np.zeros(T, np.int64), E)
    b = M.load_balance(c)
    assert b["max_over_mean"] == pytest.approx(E)
    assert b["cv"] == pytest.approx(math.sqrt(E - 1))
    assert b["unused"] == E - 1


def test_load_balance_matches_definition():
    rng = np.random.default_rng(0)
    c = rng.integers(0, 50, size=7)
    b = M.load_balance(c)
    mean = sum(c) / len(c)
    std = math.sqrt(sum((x - mean) ** 2 for x in c) / len(c))
    assert b["cv"] == pytest.approx(std / mean)
    assert b["max_over_mean"] == pytest.approx(max(c) / mean)


def test_router_entropy_uniform_and_onehot():
    E = 6
    assert M.router_entropy(np.full((3, E), 1 / E)) == pytest.approx(math.log(E))
    assert M.router_entropy(np.eye(E)) == pytest.approx(0.0, abs=1e-9)
    # padding rows are ignored
    p = np.vstack([np.eye(E)[:1], np.full((1, E), 1 / E)])
    assert M.router_entropy(p, valid_T=[True, False]) == pytest.approx(0.0, abs=1e-9)


def test_experts_per_token_variable_k():
    tok = np.array([0, 0, 0, 2, 3, 3])
    assert M.experts_per_token(tok, 4).tolist() == [3, 0, 1, 2]


def test_kept_slots_drops():
    t, e, w = M.kept_slots([0, 0, 1], [1, 2, 0], [0.5, 0.5, 1.0], keep_S=[True, False, True])
    assert t.tolist() == [0, 1] and e.tolist() == [1, 0] and w.tolist() == [0.5, 1.0]


def test_top1_expert():
    tok, exp = np.array([0, 0, 2]), np.array([3, 1, 2])
    top = M.top1_expert(tok, exp, np.array([0.2, 0.8, 1.0]), 3, 4)
    assert top.tolist() == [1, -1, 2]


# ----------------------------------------------------------------- specialisation
def test_disjoint_domains_score_one():
    # domain 0 -> experts {0,1}, domain 1 -> experts {2,3}; k=2
    T = 10
    dom = np.array([t % 2 for t in range(T)])
    tok, exp = topk_slots([[0, 1] if d == 0 else [2, 3] for d in dom])
    c = M.expert_domain_counts(tok, exp, dom, T, 4, 2)
    assert M.specialisation_score(c) == pytest.approx(1.0)
    dist = M.domain_distribution(c)
    np.testing.assert_allclose(dist[:, 0], [0.5, 0.5, 0, 0])


def test_domain_independent_routing_scores_zero():
    T = 12
    dom = np.array([t % 3 for t in range(T)])
    # every token of every domain is routed to all experts: expert choice says nothing of the domain
    tok = np.repeat(np.arange(T), 4)
    exp = np.tile(np.arange(4), T)
    c = M.expert_domain_counts(tok, exp, dom, T, 4, 3)
    assert M.specialisation_score(c) == pytest.approx(0.0, abs=1e-12)


def test_specialisation_one_domain_is_nan():
    assert math.isnan(M.specialisation_score(np.ones((4, 1))))


def test_mutual_information_oracle():
    rng = np.random.default_rng(1)
    j = rng.integers(0, 9, size=(4, 3)).astype(float)
    p = j / j.sum()
    px, py = p.sum(1), p.sum(0)
    mi = sum(p[a, b] * math.log2(p[a, b] / (px[a] * py[b])) for a in range(4) for b in range(3) if p[a, b] > 0)
    assert M.mutual_information_bits(j) == pytest.approx(mi)


def test_top_tokens_per_expert():
    ids = np.array([5, 5, 7, 9, 5])
    tok, exp = np.arange(5), np.array([0, 0, 0, 1, 1])
    top = M.top_tokens_per_expert(ids, tok, exp, 2, n=2)
    assert top[0] == [(5, 2, pytest.approx(2 / 3)), (7, 1, 1.0)]
    assert top[1] == [(5, 1, pytest.approx(1 / 3)), (9, 1, 1.0)]


# ----------------------------------------------------------------- co-activation
def test_coactivation_against_loop():
    rng = np.random.default_rng(2)
    T, E = 30, 5
    mask = rng.random((T, E)) < 0.4
    tok, exp = np.nonzero(mask)
    raw = M.coactivation(tok, exp, T, E, conditional=False)
    cond = M.coactivation(tok, exp, T, E)
    for i, j in itertools.product(range(E), range(E)):
        both = sum(mask[t, i] and mask[t, j] for t in range(T))
        assert raw[i, j] == both
        if i != j:
            n_i = mask[:, i].sum()
            assert cond[i, j] == pytest.approx(both / n_i if n_i else 0.0)
    assert np.all(np.diag(cond) == 0)


# ----------------------------------------------------------------- stability
def test_identical_checkpoints():
    rng = np.random.default_rng(3)
    m = rng.random((20, 6)) < 0.3
    m[:, 0] = True
    assert M.routing_change_fraction(m, m) == 0.0
    assert M.router_saturation(m, m) == pytest.approx(1.0)


def test_fully_changed_checkpoints():
    T = 10
    a = np.zeros((T, 4), bool); a[:, [0, 1]] = True
    b = np.zeros((T, 4), bool); b[:, [2, 3]] = True
    assert M.routing_change_fraction(a, b) == 1.0
    assert M.router_saturation(a, b) == 0.0


def test_half_overlap_saturation():
    a = np.zeros((2, 4), bool); a[:, [0, 1]] = True
    b = np.zeros((2, 4), bool); b[0, [0, 2]] = True; b[1, [0, 1]] = True
    assert M.routing_change_fraction(a, b) == 0.5
    assert M.router_saturation(a, b) == pytest.approx((0.5 + 1.0) / 2)


def test_stability_rejects_other_tokens():
    with pytest.raises(MoelabError, match="different token sets"):
        M.routing_change_fraction(np.zeros((3, 4), bool), np.zeros((5, 4), bool))


# ----------------------------------------------------------------- geometry
def test_geometric_coupling_aligned_and_orthogonal():
    D = 4
    w = np.eye(D)[:3] * 2.0  # 3 experts, router rows e0, e1, e2
    h = np.array([[1.0, 0, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1.0]])
    tok, exp = np.array([0, 1, 2]), np.array([0, 0, 1])
    g = M.geometric_coupling(w, h, tok, exp)
    assert g["router_hidden_cos_E"][0] == pytest.approx(1.0)
    assert g["router_hidden_cos_E"][1] == pytest.approx(0.0)
    assert math.isnan(g["router_hidden_cos_E"][2])  # no token routed
    np.testing.assert_allclose(g["router_router_cos_EE"], np.eye(3))
    assert g["mean_offdiag_router_cos"] == pytest.approx(0.0)


def test_geometric_coupling_oracle():
    rng = np.random.default_rng(4)
    w, h = rng.normal(size=(5, 8)), rng.normal(size=(40, 8))
    tok = np.repeat(np.arange(40), 2)
    exp = np.concatenate([rng.choice(5, 2, replace=False) for _ in range(40)])
    g = M.geometric_coupling(w, h, tok, exp)
    for e in range(5):
        mean = h[tok[exp == e]].mean(0)
        cos = w[e] @ mean / np.linalg.norm(w[e]) / np.linalg.norm(mean)
        assert g["router_hidden_cos_E"][e] == pytest.approx(cos)


# ----------------------------------------------------------------- local consistency
def test_consecutive_overlap_constant_and_alternating():
    seq = np.array([0, 0, 0, 1, 1])
    same = np.zeros((5, 4), bool); same[:, [1, 2]] = True
    assert M.consecutive_token_overlap(same, seq) == 1.0
    alt = np.zeros((5, 4), bool)
    for t in range(5):
        alt[t, [0, 1] if t % 2 == 0 else [2, 3]] = True
    assert M.consecutive_token_overlap(alt, seq) == 0.0


def test_srp_oracle_and_bounds():
    rng = np.random.default_rng(5)
    T, E, k = 24, 6, 2
    m = np.zeros((T, E), bool)
    for t in range(T):
        m[t, rng.choice(E, k, replace=False)] = True
    seq = np.repeat([0, 1], T // 2)
    got = M.segment_routing_best_performance(m, seq, seg_len=4, group_size=3)
    scores = []
    for s in (0, 1):
        idx = np.flatnonzero(seq == s)
        for i in range(idx.size - 4 + 1):
            w = m[idx[i:i + 4]]
            best = max(w[:, list(g)].sum() for g in itertools.combinations(range(E), 3))
            scores.append(best / w.sum())
    assert got == pytest.approx(np.mean(scores))
    same = np.zeros((T, E), bool); same[:, :k] = True
    assert M.segment_routing_best_performance(same, seq, 4, k) == 1.0


def _belady_brute(sets, cache_size, E):
    """Exhaustive optimum over all eviction choices (tiny inputs)."""
    best = 0

    def rec(i, j, cache, hits):
        nonlocal best
        if i == len(sets):
            best = max(best, hits)
            return
        if j == len(sets[i]):
            rec(i + 1, 0, cache, hits)
            return
        e = sets[i][j]
        if e in cache:
            rec(i, j + 1, cache, hits + 1)
        elif len(cache) < cache_size:
            rec(i, j + 1, cache | {e}, hits)
        else:
            for x in cache - set(sets[i][:j]):
                rec(i, j + 1, (cache - {x}) | {e}, hits)
    rec(0, 0, frozenset(), 0)
    return best


def test_sch_matches_brute_force_optimum():
    rng = np.random.default_rng(6)
    E, T = 5, 9
    for trial in range(5):
        m = np.zeros((T, E), bool)
        for t in range(T):
            m[t, rng.choice(E, 2, replace=False)] = True
        sets = [list(np.flatnonzero(m[t])) for t in range(T)]
        opt = _belady_brute(sets, 3, E)
        got = M.segment_cache_best_hit_rate(m, np.zeros(T, np.int64), cache_size=3)
        assert got == pytest.approx(opt / (2 * T))


def test_sch_cache_of_all_experts_misses_only_first_uses():
    m = np.zeros((6, 4), bool)
    for t in range(6):
        m[t, [t % 4, (t + 1) % 4]] = True
    assert M.segment_cache_best_hit_rate(m, np.zeros(6, np.int64), cache_size=4) == pytest.approx((12 - 4) / 12)


def test_adjacent_layer_consistency():
    rng = np.random.default_rng(7)
    a = rng.integers(0, 4, 200)
    perm = np.array([2, 0, 3, 1])
    indep = rng.integers(0, 4, 200)
    out = M.adjacent_layer_consistency(np.stack([a, perm[a], np.zeros(200, np.int64)]))
    assert out[0] == pytest.approx(1.0)
    assert math.isnan(out[1])  # collapsed next layer: undefined, not "consistent"
    low = M.adjacent_layer_consistency(np.stack([a, indep]))[0]
    assert low < 0.1


# ----------------------------------------------------------------- variable k / trajectories
def test_experts_vs_loss():
    k = np.array([1, 1, 2, 2, 3])
    loss = np.array([1.0, 2.0, 3.0, 5.0, 6.0])
    r = M.experts_vs_loss(k, loss)
    assert r["k_values"] == [1.0, 2.0, 3.0]
    assert r["mean_loss"] == [1.5, 4.0, 6.0]
    assert r["count"] == [2, 2, 1]
    assert r["pearson"] == pytest.approx(np.corrcoef(k, loss)[0, 1])
    from scipy.stats import spearmanr

    assert r["spearman"] == pytest.approx(spearmanr(k, loss).statistic)
    assert math.isnan(M.experts_vs_loss(np.ones(4), loss[:4])["pearson"])


def test_balance_trajectory_and_load_history():
    recs = [
        {"step": 1, "layers": [{"layer": 0, "load_cv": 0.5, "counts": [3, 1]}, {"layer": 2, "load_cv": 0.1, "counts": [2, 2]}]},
        {"step": 2, "layers": [{"layer": 0, "load_cv": 0.2, "counts": [1, 1]}]},
    ]
    steps, v = M.balance_trajectory(recs)
    assert steps.tolist() == [1, 2]
    assert v[0].tolist() == [0.5, 0.1] and v[1, 0] == 0.2 and math.isnan(v[1, 1])
    s, f = M.load_history(recs, 0)
    np.testing.assert_allclose(f, [[0.75, 0.25], [0.5, 0.5]])


# ----------------------------------------------------------------- bad input
def test_bad_inputs_raise():
    with pytest.raises(MoelabError, match="expert_S out of range"):
        M.choice_mask([0], [7], 1, 4)
    with pytest.raises(MoelabError, match="integers"):
        M.expert_counts(np.array([0.5]), 3)
    with pytest.raises(MoelabError, match="seg_len"):
        M.segment_routing_best_performance(np.zeros((3, 2), bool), np.zeros(3, np.int64), 0, 1)
    with pytest.raises(MoelabError, match="domain_T"):
        M.expert_domain_counts([0], [0], [5], 1, 2, 2)
