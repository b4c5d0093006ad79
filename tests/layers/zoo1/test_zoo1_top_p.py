"""top_p router (Huang et al. 2024): selection oracle, weights/gradients, dynamic loss, flat vs peaked."""

import math

import pytest
import torch

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.layers.routers import build_router
from moelab.layers.routers.top_p import top_p_mask_TE
from moelab.layers.routing import RoutingContext


def cfg(**kw):
    base = dict(d_model=12, d_ff=16, num_experts=8, k=2, router="top_p")
    base.update(kw)
    return MoEConfig(**base)


def loop_top_p(probs, p, max_k):
    """Plain-Python oracle: add experts in descending probability until the mass reaches p."""
    out = torch.zeros_like(probs, dtype=torch.bool)
    for t in range(probs.shape[0]):
        order = sorted(range(probs.shape[1]), key=lambda e: -float(probs[t, e]))
        mass = 0.0
        for rank, e in enumerate(order):
            if rank >= max_k or (rank > 0 and mass >= p):
                break
            out[t, e] = True
            mass += float(probs[t, e])
    return out


@pytest.mark.parametrize("p,max_k", [(0.4, 8), (0.9, 8), (0.9, 3), (1.0, 8), (0.05, 8)])
def test_mask_matches_loop_oracle(p, max_k):
    g = torch.Generator().manual_seed(0)
    probs = (torch.randn(50, 8, generator=g) * 1.5).softmax(-1).double()
    assert torch.equal(top_p_mask_TE(probs, p, max_k), loop_top_p(probs, p, max_k))


def test_flat_distribution_uses_more_experts_than_peaked():
    r = build_router(cfg(router_kwargs={"p": 0.5}))
    with torch.no_grad():
        r.gate.weight_ED.zero_()
        r.gate.weight_ED[3, 0] = 10.0  # feature 0 points at expert 3
    x = torch.zeros(2, 12)
    x[1, 0] = 1.0  # token 0: all logits 0 (flat); token 1: expert 3 dominates (peaked)
    n = r(x).experts_per_token_T().tolist()
    assert n[0] == math.ceil(0.5 * 8)  # flat: p*E experts are needed to reach the mass
    assert n[1] == 1


def test_weights_are_unrenormalised_probs_and_gradients_match_dense_oracle():
    torch.manual_seed(1)
    r = build_router(cfg(router_kwargs={"p": 0.7}))
    x = torch.randn(9, 12)
    res = r(x).validate()
    C = torch.randn(9, 8)
    (res.dense_TE() * C).sum().backward()
    g_router = r.gate.weight_ED.grad.clone()

    W = r.gate.weight_ED.detach().clone().requires_grad_(True)
    probs = (x @ W.t()).softmax(-1)
    mask = loop_top_p(probs.detach(), 0.7, 8)
    dense = probs * mask
    assert torch.allclose(res.dense_TE().detach(), dense.detach(), atol=1e-6)
    (dense * C).sum().backward()
    assert torch.allclose(g_router, W.grad, atol=1e-6)
    assert res.k is None


def test_dynamic_loss_is_coef_times_mean_entropy_of_real_tokens():
    torch.manual_seed(2)
    r = build_router(cfg(router_kwargs={"entropy_coef": 0.5}))
    x = torch.randn(6, 12)
    valid = torch.tensor([True, True, False, True, False, True])
    res = r(x, RoutingContext(valid_T=valid))
    probs = (x @ r.gate.weight_ED.detach().t()).softmax(-1)
    ent = -(probs * probs.log()).sum(-1)
    assert torch.allclose(res.aux_losses["dynamic_entropy"], 0.5 * ent[valid].mean(), atol=1e-6)
    assert "dynamic_entropy" not in build_router(cfg(router_kwargs={"entropy_coef": 0.0}))(x).aux_losses


def test_minimising_the_dynamic_loss_reduces_experts_per_token():
    torch.manual_seed(3)
    r = build_router(cfg(init_std=0.01, router_kwargs={"entropy_coef": 1.0, "p": 0.6}))
    x = torch.randn(64, 12)
    start = r(x).experts_per_token_T().float().mean()
    opt = torch.optim.SGD(r.parameters(), lr=2.0)
    for _ in range(60):
        opt.zero_grad()
        r(x).aux_losses["dynamic_entropy"].backward()
        opt.step()
    end = r(x).experts_per_token_T().float().mean()
    assert start > 3 and end < start - 1


@pytest.mark.parametrize("kw", [{"p": 0.0}, {"p": 1.5}, {"max_k": 0}, {"max_k": 9}, {"entropy_coef": -1.0}, {"q": 1}])
def test_bad_kwargs_raise(kw):
    with pytest.raises(MoelabError):
        build_router(cfg(router_kwargs=kw))
