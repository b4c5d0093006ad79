"""Soft / competitive routers and the ERC loss: smear, competesmoe, mixture_of_routers, erc."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from moelab.layers.config import MoEConfig
from moelab.layers.dispatch import loop_dispatch
from moelab.layers.experts import ExpertBank, expert_forward
from moelab.layers.routers import build_router
from moelab.layers.routers.erc import erc_activation_norms, erc_loss
from moelab.layers.routers.smear import merged_expert_sequences, merged_expert_tokens
from moelab.layers.routing import RoutingContext

D = 8


def cfg(name, E=4, k=2, activation="swiglu", **kw):
    return MoEConfig(d_model=D, d_ff=12, num_experts=E, k=k, router=name, router_kwargs=kw, init_std=0.3,
                     activation=activation)


def setup(name, **kw):
    torch.manual_seed(0)
    c = cfg(name, **kw)
    experts = ExpertBank(c)
    return build_router(c), experts, SimpleNamespace(experts=experts, cfg=c, dispatch_fn=loop_dispatch)


# ------------------------------------------------------------------ smear
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_smear_with_a_one_hot_distribution_equals_running_that_expert(activation):
    torch.manual_seed(0)
    experts = ExpertBank(cfg("smear", activation=activation))
    x = torch.randn(2, 5, D)
    for e in range(4):
        p = F.one_hot(torch.tensor([e, e]), 4).float()
        y = merged_expert_sequences(experts, x, p)
        assert torch.allclose(y.reshape(10, D), expert_forward(experts, x.reshape(10, D), e), atol=1e-6)
        yt = merged_expert_tokens(experts, x.reshape(10, D), F.one_hot(torch.full((10,), e), 4).float())
        assert torch.allclose(yt, expert_forward(experts, x.reshape(10, D), e), atol=1e-6)


def merged_oracle(experts, x_D, p_E):
    wg = None if experts.w_gate_EFD is None else torch.einsum("e,efd->fd", p_E, experts.w_gate_EFD)
    wu = torch.einsum("e,efd->fd", p_E, experts.w_up_EFD)
    wd = torch.einsum("e,edf->df", p_E, experts.w_down_EDF)
    h = F.gelu(wu @ x_D) if wg is None else F.silu(wg @ x_D) * (wu @ x_D)
    return wd @ h


def test_smear_token_merge_matches_explicit_merged_weights_with_gradients():
    torch.manual_seed(0)
    experts = ExpertBank(cfg("smear"))
    x = torch.randn(6, D)
    p = torch.softmax(torch.randn(6, 4), -1).requires_grad_(True)
    y = merged_expert_tokens(experts, x, p)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    gp, gw = p.grad.clone(), experts.w_up_EFD.grad.clone()
    p.grad, experts.w_up_EFD.grad = None, None
    y_ref = torch.stack([merged_oracle(experts, x[t], p[t]) for t in range(6)])
    assert torch.allclose(y, y_ref, atol=1e-5)
    (y_ref * g).sum().backward()
    assert torch.allclose(gp, p.grad, atol=1e-5) and torch.allclose(gw, experts.w_up_EFD.grad, atol=1e-5)


def test_smear_sequence_merge_routes_each_example_by_its_mean_representation():
    r, experts, layer = setup("smear", merge="sequence")
    x = torch.randn(8, D)
    valid = torch.tensor([True, True, True, False, True, True, True, True])
    ctx = RoutingContext(valid_T=valid, batch_shape=(2, 4))
    y, routing = r.forward_layer(layer, x, ctx)
    xbar0 = x[:3].mean(0)  # padding excluded
    xbar1 = x[4:].mean(0)
    p0 = torch.softmax(r.gate(xbar0[None]), -1)[0]
    p1 = torch.softmax(r.gate(xbar1[None]), -1)[0]
    assert torch.allclose(routing.probs_TE[:4], p0.expand(4, 4), atol=1e-6)
    ref = torch.cat([torch.stack([merged_oracle(experts, x[t], p0) for t in range(4)]),
                     torch.stack([merged_oracle(experts, x[t], p1) for t in range(4, 8)])])
    assert torch.allclose(y, ref, atol=1e-5)
    assert routing.num_slots == 8 * 4 and routing.k == 4 and not routing.causal
    routing.validate()


# ------------------------------------------------------------------ competesmoe
def test_competition_routes_by_expert_response_and_distils_the_router():
    r, experts, layer = setup("competesmoe", rate=1.0, warm_up=0, router_loss_coef=2.0)
    x = torch.randn(6, D)
    y, routing = r.forward_layer(layer, x)
    assert r.last_competed
    outs = torch.stack([expert_forward(experts, x, e) for e in range(4)], 1)  # [T, E, D]
    s = F.softplus(outs).mean(-1)
    top = torch.topk(s, 2).indices
    assert torch.equal(routing.expert_S.view(6, 2), top)
    w = s.gather(1, top) / s.gather(1, top).sum(-1, keepdim=True)
    assert torch.allclose(routing.weight_S.view(6, 2), w, atol=1e-6)
    ref = (w[:, :, None] * outs.gather(1, top[:, :, None].expand(-1, -1, D))).sum(1)
    assert torch.allclose(y, ref, atol=1e-5)
    mse = F.mse_loss(torch.softmax(r.gate(x), -1), torch.softmax(s, -1))
    assert torch.allclose(routing.aux_losses["compete_router"], 2.0 * mse, atol=1e-6)
    routing.aux_losses["compete_router"].backward()
    assert r.gate.weight_ED.grad.abs().sum() > 0
    assert experts.w_up_EFD.grad is None  # the distillation target is detached


def test_competesmoe_schedule_warm_up_then_rate_and_never_at_eval():
    r, experts, layer = setup("competesmoe", rate=1.0, warm_up=3)
    x = torch.randn(5, D)
    flags = []
    for _ in range(5):
        r.forward_layer(layer, x)
        flags.append(r.last_competed)
    assert flags == [False, False, False, True, True]
    r.eval()
    y, routing = r.forward_layer(layer, x)
    assert not r.last_competed and int(r.step) == 5
    assert torch.allclose(y, loop_dispatch(x, r(x), experts), atol=1e-6)
    r2, _, layer2 = setup("competesmoe", rate=0.0)
    r2.forward_layer(layer2, x)
    assert not r2.last_competed


# ------------------------------------------------------------------ mixture_of_routers
@pytest.mark.parametrize("router_top", [4, 2])
def test_mixture_of_routers_mixes_sub_router_distributions(router_top):
    r, _, _ = setup("mixture_of_routers", n_routers=4, router_top=router_top)
    x = torch.randn(9, D)
    res = r(x).validate()
    a = torch.softmax(r.main(x), -1)
    if router_top < 4:
        keep = torch.zeros_like(a, dtype=torch.bool).scatter_(1, torch.topk(a, router_top).indices, True)
        a = a * keep / (a * keep).sum(-1, keepdim=True)
    g = sum(a[:, j:j + 1] * torch.softmax(r.sub[j](x), -1) for j in range(4))
    assert torch.allclose(res.probs_TE, g, atol=1e-6)
    top = torch.topk(g, 2).indices
    assert torch.equal(res.expert_S.view(9, 2), top)
    (res.weight_S * torch.arange(18.0)).sum().backward()
    assert r.main.weight_ED.grad.abs().sum() > 0 and all(s.weight_ED.grad is not None for s in r.sub)


# ------------------------------------------------------------------ ERC loss
def coupled_pair(E=4, margin=3.0):
    """Router rows = basis vectors; expert j's input projection reads mostly coordinate j."""
    R = torch.eye(E, D)
    w_in = torch.full((E, 5, D), 0.1)
    for j in range(E):
        w_in[j, :, j] = margin
    return R, w_in


def test_erc_loss_is_zero_when_both_margins_hold():
    R, w_in = coupled_pair()
    M = erc_activation_norms(R, w_in, noise=False)
    assert (M.diagonal()[:, None] * 0.5 > M - torch.diag(M.diagonal())).all()
    assert erc_loss(R, w_in, alpha=0.5, noise=False) == 0
    # the bounded noise keeps each proxy inside its cluster: still zero
    g = torch.Generator().manual_seed(0)
    assert erc_loss(R, w_in, alpha=0.5, noise=True, generator=g) == 0


def test_erc_loss_is_positive_when_a_margin_fails_and_matches_the_hinge_oracle():
    R, w_in = coupled_pair()
    w_in[2, :, 1] = 4.0  # expert 2 responds strongly to proxy 1: both constraints break
    loss = erc_loss(R, w_in, alpha=0.5, noise=False)
    M = torch.stack([torch.stack([(w_in[j] @ R[i]).norm() for j in range(4)]) for i in range(4)])
    ref = sum(F.relu(M[i, j] - 0.5 * M[j, j]) + F.relu(M[i, j] - 0.5 * M[i, i])
              for i in range(4) for j in range(4) if i != j) / 16
    assert loss > 0 and torch.allclose(loss, ref)


def test_erc_loss_gradients_reach_router_and_experts_and_cost_is_batch_free():
    torch.manual_seed(0)
    c = cfg("erc", E=4)
    experts = ExpertBank(c)
    R = torch.randn(4, D, requires_grad=True)
    loss = erc_loss(R, experts, alpha=0.3)
    loss.backward()
    assert loss > 0 and R.grad.abs().sum() > 0 and experts.w_gate_EFD.grad.abs().sum() > 0
    assert experts.w_up_EFD.grad is None  # SwiGLU: the gate projection is the input projection


def test_erc_router_adds_the_loss_through_the_layer_seam():
    r, experts, layer = setup("erc", erc_coef=0.5, alpha=0.5)
    x = torch.randn(6, D)
    y, routing = r.forward_layer(layer, x)
    assert torch.allclose(y, loop_dispatch(x, r(x), experts), atol=1e-6)
    assert "erc" in routing.aux_losses and routing.aux_losses["erc"] > 0
    r.eval()
    _, routing = r.forward_layer(layer, x)
    assert "erc" not in routing.aux_losses
