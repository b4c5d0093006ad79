"""Geometric routers: cosine (Equifinality / X-MoE / Tutel) and norm (UniPool's NormRouter)."""

import math

import pytest
import torch

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.layers.routers import build_router
from moelab.layers.routers.norm import monte_carlo_scale


def cfg(router, **kw):
    base = dict(d_model=16, d_ff=16, num_experts=6, k=2, router=router)
    base.update(kw)
    return MoEConfig(**base)


# ----------------------------------------------------------------------------- cosine
def cosine_oracle(r, x):
    """Per-token loop: cos(P x, c_e) * min(exp(s), max_scale), softmax, top-k, renormalise."""
    scale = min(math.exp(float(r.log_scale.detach())), math.exp(r.max_log_scale))
    dense = torch.zeros(x.shape[0], r.num_experts)
    for t in range(x.shape[0]):
        z = r.proj_PD.detach() @ x[t]
        logits = torch.stack([
            torch.dot(z, c) / (z.norm() * c.norm()) for c in r.centroids_EP.detach()
        ]) * scale
        p = logits.softmax(-1)
        top = p.topk(r.k)
        dense[t, top.indices] = top.values / top.values.sum()
    return dense


def test_cosine_matches_loop_oracle_and_defaults():
    torch.manual_seed(0)
    r = build_router(cfg("cosine"))
    assert r.proj_PD.shape == (64, 16) and r.centroids_EP.shape == (6, 64)
    assert float(r.scale().detach()) == pytest.approx(2.0)  # init temperature 0.5
    x = torch.randn(10, 16)
    res = r(x).validate()
    assert torch.allclose(res.dense_TE().detach(), cosine_oracle(r, x), atol=1e-5)


@pytest.mark.parametrize("c", [1e-3, 0.5, 7.0, 1e4])
def test_cosine_routing_is_invariant_to_input_scale(c):
    torch.manual_seed(1)
    r = build_router(cfg("cosine", router_kwargs={"d_space": 8}))
    x = torch.randn(20, 16)
    a, b = r(x), r(c * x)
    assert torch.equal(a.expert_S, b.expert_S)
    assert torch.allclose(a.weight_S, b.weight_S, atol=1e-5)


def test_cosine_temperature_is_clamped_and_all_parameters_learn():
    torch.manual_seed(2)
    r = build_router(cfg("cosine", router_kwargs={"max_scale": 10.0}))
    x = torch.randn(8, 16)
    (r(x).dense_TE() * torch.randn(8, 6)).sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in r.parameters())
    with torch.no_grad():
        r.log_scale.fill_(5.0)  # exp(5) > 10: clamped
    r.zero_grad()
    res = r(x)
    assert float(r.scale().detach()) == pytest.approx(10.0)
    assert torch.allclose(res.dense_TE().detach(), cosine_oracle(r, x), atol=1e-5)
    (res.dense_TE() * torch.randn(8, 6)).sum().backward()
    assert float(r.log_scale.grad.abs()) == 0.0  # no gradient through the clamp


# ----------------------------------------------------------------------------- norm
def norm_oracle(r, x):
    dense = torch.zeros(x.shape[0], r.num_experts)
    for t in range(x.shape[0]):
        logits = r.gate.weight_ED.detach() @ x[t]
        s = torch.relu(logits / (logits.norm() + r.eps)) * float(r.norm_scale.detach()) * r.scale_initial
        for e in s.topk(r.k).indices.tolist():
            dense[t, e] = s[e]
    return dense


def test_norm_matches_loop_oracle_including_gradients():
    torch.manual_seed(3)
    r = build_router(cfg("norm", router_kwargs={"scale_init": "monte_carlo"}))
    x = torch.randn(12, 16)
    res = r(x).validate()
    assert torch.allclose(res.dense_TE().detach(), norm_oracle(r, x), atol=1e-6)
    C = torch.randn(12, 6)
    (res.dense_TE() * C).sum().backward()
    W = r.gate.weight_ED.detach().clone().requires_grad_(True)
    s_ = r.norm_scale.detach().clone().requires_grad_(True)
    logits = x @ W.t()
    scores = torch.relu(logits / (logits.norm(dim=-1, keepdim=True) + r.eps)) * s_ * r.scale_initial
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter(1, scores.detach().topk(2).indices, True)
    ((scores * mask) * C).sum().backward()
    assert torch.allclose(r.gate.weight_ED.grad, W.grad, atol=1e-6)
    assert torch.allclose(r.norm_scale.grad, s_.grad, atol=1e-6)


@pytest.mark.parametrize("c", [1e-3, 0.3, 50.0, 1e4])
def test_norm_router_is_scale_stable(c):
    torch.manual_seed(4)
    r = build_router(cfg("norm"))
    x = torch.randn(20, 16)
    a, b = r(x), r(c * x)
    assert torch.equal(a.expert_S, b.expert_S)
    assert torch.allclose(a.weight_S, b.weight_S, atol=1e-5)
    # and so is the score scale: weights depend on the learnable scale only
    assert float(a.weight_S.detach().max()) <= float(r.norm_scale.detach()) + 1e-6


def test_norm_zero_score_slots_are_not_emitted():
    r = build_router(cfg("norm", k=3))
    with torch.no_grad():
        r.gate.weight_ED.copy_(-torch.eye(6, 16))
        r.gate.weight_ED[0, 0] = 1.0
    x = torch.zeros(1, 16)
    x[0, 0] = 1.0  # only expert 0 has a positive logit
    res = r(x).validate()
    assert res.expert_S.tolist() == [0] and res.k is None


def test_monte_carlo_scale():
    v = monte_carlo_scale(8, 2)
    assert v == monte_carlo_scale(8, 2) and v > 1.0  # the top-k of a unit vector has norm < 1
    # E = k = 2: the estimate is E[||z|| / ||relu(z)||] over samples with a positive component
    z = torch.randn(20000, 2, generator=torch.Generator().manual_seed(42), dtype=torch.float64)
    rz = torch.relu(z).norm(dim=-1)
    want = float((z.norm(dim=-1)[rz > 0] / rz[rz > 0]).mean())
    assert monte_carlo_scale(2, 2) == pytest.approx(want, rel=1e-9)
    assert math.isfinite(monte_carlo_scale(3, 1))


@pytest.mark.parametrize("router,kw", [("cosine", {"d_space": 0}), ("cosine", {"init_temperature": 0.0}),
                                       ("cosine", {"max_scale": 0.5}), ("norm", {"scale_init": "two"}),
                                       ("norm", {"eps": 0.0})])
def test_bad_kwargs_raise(router, kw):
    with pytest.raises(MoelabError):
        build_router(cfg(router, router_kwargs=kw))


def test_cosine_k1_keeps_the_raw_probability_so_the_router_learns():
    torch.manual_seed(5)
    r = build_router(cfg("cosine", k=1))
    x = torch.randn(6, 16)
    res = r(x)
    assert torch.allclose(res.weight_S, res.probs_TE.max(-1).values)
    res.weight_S.sum().backward()
    assert float(r.proj_PD.grad.abs().sum()) > 0
