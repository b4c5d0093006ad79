"""Balanced-assignment routers: sinkhorn (S-BASE, selective), base (BASE layers), bip."""

import itertools

import numpy as np
import pytest
import torch

from moelab.layers.config import MoEConfig
from moelab.layers.routers import build_router
from moelab.layers.routers._zoo2_common import sinkhorn_knopp
from moelab.layers.routers.base_layers import balanced_assignment
from moelab.layers.routers.bip import bip_dual_prices
from moelab.layers.routing import RoutingContext


def make(name, E=4, k=1, D=8, **kw):
    torch.manual_seed(0)
    return build_router(MoEConfig(d_model=D, num_experts=E, k=k, router=name, router_kwargs=kw))


def skewed_x(r, T=48, favourite=0, gap=3.0):
    """Inputs whose logits are ``N(0, 1) + gap`` on one expert: plain top-k collapses onto it."""
    w = r.gate.weight_ED.detach()
    g = torch.Generator().manual_seed(1)
    target = torch.randn(T, w.shape[0], generator=g)
    target[:, favourite] += gap
    return target @ torch.linalg.pinv(w).T  # x @ w.T == target


# ------------------------------------------------------------------ sinkhorn
def test_sinkhorn_knopp_has_balanced_marginals():
    logits = torch.randn(24, 6) * 3
    P = sinkhorn_knopp(logits, n_iters=500, tol=1e-9)
    assert torch.allclose(P.sum(1), torch.full((24,), 1 / 24), atol=1e-5)
    assert torch.allclose(P.sum(0), torch.full((6,), 1 / 6), atol=1e-5)
    # a diagonal rescaling of exp(logits): log P - logits = a_t + b_e (rank-one in log space)
    R = torch.log(P) - logits
    assert torch.allclose(R - R[:, :1] - R[:1, :] + R[0, 0], torch.zeros_like(R), atol=1e-4)


@pytest.mark.parametrize("k", [1, 2])
def test_sbase_balances_a_collapsed_router_in_training_only(k):
    r = make("sinkhorn", E=4, k=k)
    x = skewed_x(r)
    r.eval()
    plain = r(x)
    assert plain.counts_E().max() >= 40  # plain top-k collapses onto the favourite (48 tokens)
    assert torch.equal(plain.expert_S.view(-1, k), torch.topk(r.gate(x), k, dim=-1).indices)
    r.train()
    res = r(x).validate()
    counts = res.counts_E().float()
    plain_ratio = plain.counts_E().float().max() / counts.mean()
    # S-BASE is approximately balanced (top-k of an entropic plan whose columns are exactly equal)
    assert counts.max() / counts.mean() <= 1.3 < plain_ratio
    assert counts.min() > 0


def test_sbase_weights_are_the_unbalanced_gate():
    r = make("sinkhorn", E=4, k=1)
    x = skewed_x(r)
    res = r(x)
    logits = r.gate(x).detach()
    assert torch.allclose(res.weight_S.detach(), torch.sigmoid(logits[res.token_S, res.expert_S]))
    res.weight_S.sum().backward()
    assert r.gate.weight_ED.grad is not None and r.gate.weight_ED.grad.abs().sum() > 0


def test_selective_sinkhorn_gates_come_from_the_transport_plan():
    r = make("sinkhorn", E=4, k=2, variant="selective", ot_prob=1.0, n_iters=200, tol=1e-9)
    x = skewed_x(r)
    res = r(x)
    assert r.last_used_ot
    P = sinkhorn_knopp(r.gate(x).detach(), 200, 1e-9) * x.shape[0]
    assert torch.allclose(res.weight_S.detach(), P[res.token_S, res.expert_S], atol=1e-5)
    assert torch.equal(res.expert_S.view(-1, 2).sort(-1).values, torch.topk(P, 2).indices.sort(-1).values)
    res.weight_S.sum().backward()  # differentiable through the unrolled iterations
    assert torch.isfinite(r.gate.weight_ED.grad).all() and r.gate.weight_ED.grad.abs().sum() > 0


def test_selective_sinkhorn_without_ot_is_softmax_topk():
    r = make("sinkhorn", E=4, k=2, variant="selective", ot_prob=0.0)
    x = skewed_x(r)
    res = r(x)
    assert not r.last_used_ot
    p = torch.softmax(r.gate(x).detach(), -1)
    assert torch.equal(res.expert_S.view(-1, 2), torch.topk(p, 2).indices)
    assert torch.allclose(res.weight_S.detach(), p[res.token_S, res.expert_S])


def test_sinkhorn_ignores_padding_tokens():
    r = make("sinkhorn", E=4, k=1)
    x = skewed_x(r, T=40)
    valid = torch.ones(40, dtype=torch.bool)
    valid[32:] = False
    res = r(x, RoutingContext(valid_T=valid))
    counts = res.counts_E().float()  # real tokens only
    assert counts.sum() == 32 and counts.max() / counts.mean() <= 1.6


# ------------------------------------------------------------------ BASE
def brute_force_best(scores):
    T, E = scores.shape
    best = -np.inf
    for a in itertools.product(range(E), repeat=T):
        if np.bincount(a, minlength=E).max() - np.bincount(a, minlength=E).min() <= (0 if T % E == 0 else 1):
            best = max(best, scores[np.arange(T), a].sum())
    return best


@pytest.mark.parametrize("T,E", [(6, 2), (6, 3), (7, 3), (5, 2)])
def test_balanced_assignment_is_optimal_and_balanced(T, E):
    rng = np.random.default_rng(T * 10 + E)
    s = rng.normal(size=(T, E))
    a = balanced_assignment(s)
    loads = np.bincount(a, minlength=E)
    assert loads.max() - loads.min() <= (0 if T % E == 0 else 1)
    assert np.isclose(s[np.arange(T), a].sum(), brute_force_best(s))


@pytest.mark.parametrize("k", [1, 2])
def test_base_is_exactly_balanced_in_training_and_greedy_at_eval(k):
    r = make("base", E=4, k=k)
    x = skewed_x(r, T=48)
    res = r(x).validate()
    assert res.counts_E().tolist() == [48 * k // 4] * 4
    r.eval()
    ev = r(x)
    assert torch.equal(ev.expert_S.view(-1, k), torch.topk(r.gate(x), k).indices)


def test_base_gate_is_sigmoid_of_affinity_and_trains():
    r = make("base", E=4, k=1)
    x = skewed_x(r, T=16)
    res = r(x)
    logits = r.gate(x).detach()
    assert torch.allclose(res.weight_S.detach(), torch.sigmoid(logits[res.token_S, res.expert_S]))
    res.weight_S.sum().backward()
    assert r.gate.weight_ED.grad.abs().sum() > 0


def test_base_padding_is_excluded_from_balancing():
    r = make("base", E=4, k=1)
    x = skewed_x(r, T=20)
    valid = torch.tensor([True] * 16 + [False] * 4)
    res = r(x, RoutingContext(valid_T=valid))
    assert res.counts_E().tolist() == [4, 4, 4, 4]


# ------------------------------------------------------------------ BIP
def test_bip_prices_balance_loads_from_the_first_step():
    r = make("bip", E=4, k=2, n_iters=8)
    x = skewed_x(r, T=64)
    plain = torch.topk(torch.softmax(r.gate(x).detach(), -1), 2).indices
    plain_max = torch.bincount(plain.reshape(-1), minlength=4).max()
    res = r(x).validate()
    m = 64 * 2 // 4
    assert plain_max > 1.5 * m
    assert res.counts_E().max() <= 1.2 * m
    assert torch.equal(res.selection_bias_E, -r.q_E)
    # weights come from the unbiased scores
    p = torch.softmax(r.gate(x).detach(), -1)
    w = p[res.token_S, res.expert_S].view(-1, 2)
    assert torch.allclose(res.weight_S.detach().view(-1, 2), w / w.sum(-1, keepdim=True))


def test_bip_prices_are_zero_when_capacity_never_binds():
    s = torch.eye(4).repeat(8, 1) * 0.5 + 0.1  # every expert is the favourite of 8 of 32 tokens
    q = bip_dual_prices(s, torch.zeros(4), k=1, n_iters=5)
    assert torch.allclose(q, torch.zeros(4))


def test_bip_eval_uses_stored_prices_without_updating():
    r = make("bip", E=4, k=1)
    x = skewed_x(r, T=32)
    r(x)
    q = r.q_E.clone()
    r.eval()
    res = r(x)
    assert torch.equal(r.q_E, q)
    assert torch.equal(res.expert_S, torch.topk(torch.softmax(r.gate(x).detach(), -1) - q, 1).indices.view(-1))
