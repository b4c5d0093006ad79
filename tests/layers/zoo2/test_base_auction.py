"""BASE layers' fast balanced assignment (fairseq's auction + negative-cycle canceling) against the exact
Hungarian solver (``exact_balanced_assignment``, the oracle) and a brute force on tiny problems."""

import itertools

import numpy as np
import pytest
import torch

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.layers.routers import build_router
from moelab.layers.routers.base_layers import (
    EXACT_MAX_TOKENS,
    _fairseq_auction,
    auction_balanced_assignment,
    balanced_assignment,
    exact_balanced_assignment,
)


def scores(T, E, seed, skew=1.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(T, E)) + skew * rng.normal(size=(1, E))  # some experts popular


def objective(s, a):
    return float(s[np.arange(len(a)), a].sum())


def assert_balanced(a, T, E):
    loads = np.bincount(a, minlength=E)
    assert loads.sum() == T and set(loads.tolist()) <= {T // E, T // E + 1}, loads
    assert (loads == T // E + 1).sum() == T % E


@pytest.mark.parametrize("T,E,seed", [(512, 8, 0), (512, 8, 1), (500, 8, 2), (301, 7, 3), (256, 16, 4)])
def test_auction_reaches_the_exact_objective(T, E, seed):
    s = scores(T, E, seed)
    a = auction_balanced_assignment(s)
    assert_balanced(a, T, E)
    exact = objective(s, exact_balanced_assignment(s))
    assert abs(objective(s, a) - exact) <= 1e-3 * abs(exact)   # the target: within 0.1%
    assert objective(s, a) == pytest.approx(exact, rel=1e-9)    # in fact optimal


def test_cycle_canceling_improves_on_fairseqs_auction():
    s = scores(512, 8, 5)
    rough = _fairseq_auction(s, float(s.max() - s.min()))
    assert_balanced(rough, 512, 8)
    exact = objective(s, exact_balanced_assignment(s))
    assert objective(s, rough) < exact - 1e-6           # eps-optimal only ...
    assert objective(s, rough) > exact - 0.01 * abs(exact)
    assert objective(s, auction_balanced_assignment(s)) == pytest.approx(exact, rel=1e-9)  # ... then optimal


def test_forbidden_pairs_are_avoided_like_the_exact_solver():
    s = scores(400, 8, 6)
    first = s.argmax(1)
    s[np.arange(400), first] = -np.inf  # the k=2 round: a token's first expert is forbidden
    a = auction_balanced_assignment(s)
    assert_balanced(a, 400, 8)
    assert np.isfinite(s[np.arange(400), a]).all()
    fin = np.where(np.isfinite(s), s, 0.0)
    assert objective(fin, a) == pytest.approx(objective(fin, exact_balanced_assignment(s)), rel=1e-9)


def brute_force_best(s):
    T, E = s.shape
    best = -np.inf
    for a in itertools.product(range(E), repeat=T):
        loads = np.bincount(a, minlength=E)
        if loads.max() - loads.min() <= (0 if T % E == 0 else 1):
            best = max(best, s[np.arange(T), a].sum())
    return best


@pytest.mark.parametrize("T,E", [(6, 2), (6, 3), (7, 3), (5, 2), (8, 4)])
def test_auction_is_optimal_on_tiny_problems(T, E):
    s = scores(T, E, T * 10 + E)
    a = auction_balanced_assignment(s)
    assert_balanced(a, T, E)
    assert objective(s, a) == pytest.approx(brute_force_best(s))


def test_auto_method_uses_exact_for_small_batches_and_auction_beyond():
    s = scores(EXACT_MAX_TOKENS + 72, 8, 7)
    for method in ("auto", "auction", "exact"):
        assert objective(s, balanced_assignment(s, method)) == pytest.approx(
            objective(s, exact_balanced_assignment(s)), rel=1e-9)
    with pytest.raises(MoelabError, match="method='hungarian'"):
        balanced_assignment(s, "hungarian")


def test_empty_and_single_token_inputs():
    assert auction_balanced_assignment(np.zeros((0, 4))).shape == (0,)
    assert auction_balanced_assignment(np.array([[0.1, 0.9, 0.3]])).tolist() == [1]


@pytest.mark.parametrize("k", [1, 2])
def test_base_router_balances_a_large_batch_through_the_auction(k):
    torch.manual_seed(0)
    r = build_router(MoEConfig(d_model=16, num_experts=8, k=k, router="base"))
    x = torch.randn(512, 16) + 2.0 * r.gate.weight_ED.detach()[0]  # expert 0 popular
    res = r(x)
    assert res.counts_E().tolist() == [512 * k // 8] * 8
