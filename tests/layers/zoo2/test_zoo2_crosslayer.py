"""Cross-layer / multi-step routers: recurrent (RMoE), attention_router (Yuan 2.0-M32), chain_of_experts."""

from dataclasses import replace
from types import SimpleNamespace

import torch

from moelab.layers.config import MoEConfig
from moelab.layers.dispatch import loop_dispatch
from moelab.layers.experts import ExpertBank, expert_forward
from moelab.layers.routers import build_router
from moelab.layers.routers.recurrent import STATE_KEY
from moelab.layers.routing import RoutingContext

D = 8


def cfg(name, E=4, k=2, **kw):
    return MoEConfig(d_model=D, d_ff=12, num_experts=E, k=k, router=name, router_kwargs=kw, init_std=0.3)


# ------------------------------------------------------------------ recurrent
def test_recurrent_logits_follow_the_gru_over_depth():
    torch.manual_seed(0)
    r0, r1 = build_router(cfg("recurrent", hidden_dim=6)), build_router(cfg("recurrent", hidden_dim=6))
    x0, x1 = torch.randn(5, D), torch.randn(5, D)
    ctx = RoutingContext(state={})
    ctx.layer_index = 0
    a = r0(x0, ctx)
    ctx.layer_index = 1
    b = r1(x1, ctx)
    h0 = r0.gru(r0.proj(x0), torch.zeros(5, 6))
    h1 = r0.gru(r1.proj(x1), h0)  # one GRU cell shared over depth (the first layer's)
    assert torch.allclose(a.logits_TE, r0.out(h0), atol=1e-6)
    assert torch.allclose(b.logits_TE, r1.out(h1), atol=1e-6)
    assert ctx.state[STATE_KEY]["layer_index"] == 1
    # share_gru=False: every layer uses its own cell
    r1.share_gru = False
    ctx = RoutingContext(state={})
    r0(x0, ctx)
    b2 = r1(x1, replace(ctx, layer_index=1))
    assert torch.allclose(b2.logits_TE, r1.out(r1.gru(r1.proj(x1), h0)), atol=1e-6)


def test_recurrent_decision_in_layer_l_depends_on_earlier_layers():
    torch.manual_seed(0)
    r0, r1 = build_router(cfg("recurrent")), build_router(cfg("recurrent"))
    x1 = torch.randn(32, D)
    outs = []
    for seed in (1, 2):  # same layer-1 input, different layer-0 inputs
        torch.manual_seed(seed)
        ctx = RoutingContext(state={})
        r0(torch.randn(32, D) * 3, ctx)
        outs.append(r1(x1, replace(ctx, layer_index=1)))  # the model's way: shared state dict
    assert not torch.allclose(outs[0].logits_TE, outs[1].logits_TE)
    assert not torch.equal(outs[0].expert_S, outs[1].expert_S)
    alone = r1(x1, RoutingContext(state={}))  # no earlier layer: state starts at zero
    assert torch.allclose(alone.logits_TE, r1.out(r1.gru(r1.proj(x1), torch.zeros(32, r1.hidden_dim))), atol=1e-6)
    # gradients flow back through the recurrence into the earlier layer's router
    ctx = RoutingContext(state={})
    r0(torch.randn(32, D), ctx)
    r1(x1, replace(ctx, layer_index=1)).logits_TE.sum().backward()
    assert r0.proj.weight_ED.grad is not None and r0.proj.weight_ED.grad.abs().sum() > 0
    # a state written by the same (or a deeper) layer is never reused, e.g. a context reused
    # across forwards of a one-layer model
    r0.zero_grad()
    again = r0(x1, ctx)
    assert torch.allclose(again.logits_TE, r0.out(r0.gru(r0.proj(x1), torch.zeros(32, r0.hidden_dim))), atol=1e-6)


# ------------------------------------------------------------------ attention_router
def test_attention_router_matches_a_per_token_loop():
    torch.manual_seed(0)
    r = build_router(cfg("attention_router", E=5, k=2))
    x = torch.randn(7, D)
    res = r(x)
    W = r.qkv.weight_ED.detach()
    Wq, Wk, Wv = W[:5], W[5:10], W[10:]
    for t in range(7):
        q, k, v = Wq @ x[t], Wk @ x[t], Wv @ x[t]
        A = torch.softmax(torch.outer(q, k), dim=-1)
        assert torch.allclose(res.logits_TE[t], A @ v, atol=1e-6)
    top = torch.topk(res.logits_TE.detach(), 2).indices
    assert torch.equal(res.expert_S.view(7, 2), top)
    assert torch.allclose(res.weight_S.view(7, 2), torch.softmax(res.logits_TE.gather(1, top), -1))


# ------------------------------------------------------------------ chain_of_experts
def coe_oracle(r, experts, x):
    """x^(t) = x^(t-1) + sum_{top-(K/C) of router t} s E(x^(t-1)); returns x^(C). A plain loop."""
    xt = x.clone()
    for it in range(r.n_iters):
        logits = r.gates[it](xt)
        p = torch.softmax(logits, -1)
        top = torch.topk(p, r.k_iter).indices
        new = xt.clone()
        for t in range(x.shape[0]):
            for j in range(r.k_iter):
                e = int(top[t, j])
                new[t] = new[t] + p[t, e] * expert_forward(experts, xt[t:t + 1], e)[0]
        xt = new
    return xt


def test_chain_of_experts_matches_the_iterative_residual_oracle():
    torch.manual_seed(0)
    c = cfg("chain_of_experts", E=6, k=6, n_iters=3)
    r, experts = build_router(c), ExpertBank(c)
    assert r.k_iter == 2  # K/C experts per iteration
    layer = SimpleNamespace(experts=experts, cfg=c, dispatch_fn=loop_dispatch)
    x = torch.randn(6, D, requires_grad=True)
    y, routing = r.forward_layer(layer, x, RoutingContext())
    x2 = x.detach().clone().requires_grad_(True)
    y_ref = coe_oracle(r, experts, x2)
    assert torch.allclose(y, y_ref, atol=1e-5)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    gx = x.grad.clone()
    r.zero_grad()
    experts.zero_grad()
    (y_ref * g).sum().backward()
    assert torch.allclose(gx, x2.grad, atol=1e-5)
    assert torch.equal(routing.expert_S, r(x.detach()).expert_S)  # the first iteration's routing
    # iterations 2..C are balanced too: each one's Switch loss, from its own routing (oracle below)
    assert set(routing.aux_losses) == {"aux_loss_iter1", "aux_loss_iter2"}
    xt = x.detach().clone()
    for it in range(r.n_iters):
        p = torch.softmax(r.gates[it](xt), -1)
        top = torch.topk(p, r.k_iter).indices
        if it > 0:  # E * sum_i f_i * P_i by hand: f from the iteration's own top-k, P its mean softmax
            f = torch.bincount(top.reshape(-1), minlength=6).float() / top.numel()
            want = c.aux_loss_coef * 6 * (f * p.mean(0)).sum()
            assert torch.allclose(routing.aux_losses[f"aux_loss_iter{it}"], want, atol=1e-6)
        xt = xt + torch.stack([sum(p[t, e] * expert_forward(experts, xt[t:t + 1], int(e))[0] for e in top[t])
                               for t in range(6)])


def test_chain_of_experts_with_one_iteration_is_a_standard_moe():
    torch.manual_seed(0)
    c = cfg("chain_of_experts", E=4, k=2, n_iters=1)
    r, experts = build_router(c), ExpertBank(c)
    layer = SimpleNamespace(experts=experts, cfg=c, dispatch_fn=loop_dispatch)
    x = torch.randn(6, D)
    y, routing = r.forward_layer(layer, x)
    assert r.k_iter == 2 and torch.allclose(y, x + loop_dispatch(x, r(x), experts), atol=1e-6)  # y = x^(1)
    r.residual = "outer"  # no inner residual: exactly a standard (non-renormalised) top-k MoE
    y2, _ = r.forward_layer(layer, x)
    assert torch.allclose(y2, loop_dispatch(x, r(x), experts), atol=1e-6) and not torch.allclose(y2, y)
    p = torch.softmax(r.gates[0](x), -1)
    assert torch.allclose(routing.weight_S.view(6, 2), p.gather(1, torch.topk(p, 2).indices))
