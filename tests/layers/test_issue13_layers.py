"""Issue 13, layer part: each test fails on the code before the fix (noted per test) and checks the
library against an independent oracle (a loop, a hand-computed value, a dense computation)."""

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from moelab.errors import MoelabError
from moelab.layers.balancing import install_aux_free_hook
from moelab.layers.config import MoEConfig
from moelab.layers.layouts import LayoutConfig
from moelab.layers.moe import MoELayer
from moelab.layers.pool import build_layout
from moelab.layers.routers import build_router
from moelab.layers.routing import RoutingContext

D = 16


def _stack(layout: LayoutConfig, cfg: MoEConfig, L: int):
    owner, layers = build_layout(layout, cfg, list(range(L)))
    return owner, [layers[i] for i in range(L)]


def _run(layers, xs, ctx=None):
    """Each layer on its own input, one shared RoutingContext (as the model runs them)."""
    ctx = ctx if ctx is not None else RoutingContext(state={})
    return [layer(x, replace(ctx, layer_index=i)) for i, (layer, x) in enumerate(zip(layers, xs))]


# ----------------------------------------------------------------- decision / omni sharing
OWNED = [("relu", {"l1_init": 1.0}), ("top_p", {"entropy_coef": 1.0}), ("null_experts", {"balance_coef": 1.0}),
         ("noisy_topk", {"importance_coef": 1.0, "load_coef": 1.0}), ("stablemoe", {"vocab_size": 64})]


@pytest.mark.parametrize("router,kw", OWNED, ids=[r for r, _ in OWNED])
def test_decision_sharing_counts_router_owned_losses_once(router, kw):
    """Before: the gradient of the router-owned losses grew with the number of layers (x3 at L=3)."""
    x = torch.randn(12, D, generator=torch.Generator().manual_seed(1))
    grads = []
    for L in (1, 3):
        torch.manual_seed(0)
        cfg = MoEConfig(d_model=D, d_ff=24, num_experts=4, k=2, router=router, router_kwargs=kw, aux_loss="none")
        _, layers = _stack(LayoutConfig(router_sharing="decision"), cfg, L)
        torch.manual_seed(5)  # same noise draws (noisy top-k) whatever the number of layers built
        ctx = RoutingContext(token_ids_T=torch.arange(12) % 7, state={})
        outs = _run(layers, [x] * L, ctx)
        assert all("relu_l1" not in l.last_aux for l in layers[1:]) if router == "relu" else True
        sum((y * 0).sum() for y in outs).backward()  # only the attached aux losses send gradient
        grads.append(torch.cat([p.grad.reshape(-1) for p in layers[0].router.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_omni_sharing_counts_each_layers_own_router_losses():
    """Omni-Router: every layer routes its own hidden state, so each layer's router-owned loss counts
    once; oracle: the same router called on each input in a loop, losses summed, backward."""
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=D, d_ff=24, num_experts=4, k=2, router="relu", router_kwargs={"l1_init": 1.0},
                    aux_loss="none")
    _, layers = _stack(LayoutConfig(router_sharing="omni"), cfg, 3)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(10, D, generator=g) for _ in range(3)]
    oracle = copy.deepcopy(layers[0].router)
    sum((y * 0).sum() for y in _run(layers, xs)).backward()
    sum(oracle(x).aux_losses["relu_l1"] for x in xs).backward()
    torch.testing.assert_close(layers[0].router.gate.weight_ED.grad, oracle.gate.weight_ED.grad)


# ----------------------------------------------------------------- aux_loss="global" off Router.forward
def test_chain_of_experts_global_loss_reads_each_iterations_own_counts():
    """Iteration 1 sends every token to expert 0, iteration 2 to expert 3: each iteration's global
    Switch loss is E * f * P = 4 * 1 * 1 = 4 by hand. Before: iteration 2 read iteration 1's counts,
    value ~1e-29 (a collapsed iteration was never penalised)."""
    cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4, k=2, router="chain_of_experts", aux_loss="global",
                    aux_loss_coef=1.0, router_kwargs={"n_iters": 2, "k_per_iter": 1})
    layer = MoELayer(cfg)
    with torch.no_grad():
        g0, g1 = layer.router.gates
        g0.weight_ED.zero_()
        g0.weight_ED[0] = 10.0
        g1.weight_ED.zero_()
        g1.weight_ED[3] = 10.0
    layer(torch.rand(64, 8) + 0.5)
    assert layer.last_aux["aux_loss"].item() == pytest.approx(4.0, rel=1e-4)
    assert layer.last_aux["aux_loss_iter1"].item() == pytest.approx(4.0, rel=1e-4)
    assert layer.router.iter_global_load[0].count_E.tolist() == [0, 0, 0, 64]


def test_competesmoe_global_loss_reads_the_competition_counts():
    """On a competition step the executed routing is the competition's: the global loss is its own
    Switch loss, by hand from its counts and probabilities. Before: the router's counts were used."""
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4, k=1, router="competesmoe", aux_loss="global",
                    aux_loss_coef=1.0, router_kwargs={"rate": 1.0})
    layer = MoELayer(cfg)
    with torch.no_grad():  # the router sends everything to expert 0; the competition decides otherwise
        layer.router.gate.weight_ED.zero_()
        layer.router.gate.weight_ED[0] = 10.0
    x = torch.rand(32, 8) + 0.5
    layer(x)
    r = layer.last_routing
    assert layer.router.last_competed and r.counts_E()[0] < 32
    f = torch.bincount(r.expert_S, minlength=4).float() / 32
    want = 4 * (f * r.probs_TE.mean(0)).sum()
    assert layer.last_aux["aux_loss"].item() == pytest.approx(want.item(), rel=1e-5)
    assert layer.router.global_load.count_E.tolist() == torch.bincount(r.expert_S, minlength=4).tolist()


# ----------------------------------------------------------------- Chain-of-Experts residual, block level
def _coe_block(residual: str, zero_experts: bool):
    from moelab.models.config import ModelConfig
    from moelab.models.transformer import Block

    torch.manual_seed(0)
    moe = MoEConfig(d_model=D, d_ff=24, num_experts=4, k=2, router="chain_of_experts", init_std=0.3,
                    router_kwargs={"n_iters": 2, "residual": residual})
    mcfg = ModelConfig(vocab_size=32, d_model=D, n_layers=1, n_heads=2, d_ff_dense=32, max_seq_len=8, moe=moe)
    layer = MoELayer(moe)
    if zero_experts:
        with torch.no_grad():
            layer.experts.w_down_EDF.zero_()
    return Block(mcfg, 0, layer), layer


def _block_io(block):
    from moelab.models.transformer import rope_tables

    cos, sin = rope_tables(D // 2, 8, 10000.0)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3))
    out = block(x, cos, sin, RoutingContext(batch_shape=(2, 5), state={}))
    with torch.no_grad():
        x_att = x + block.attn(block.attn_norm(x), cos, sin)
    return x_att, block.ffn_norm(x_att).detach(), out


def _chain_oracle(router, experts, h_TD, inner: bool):
    from moelab.layers.experts import expert_forward

    xt = h_TD.clone()
    for it in range(router.n_iters):
        p = torch.softmax(router.gates[it](xt), -1)
        top = p.topk(router.k_iter, -1).indices
        upd = torch.stack([sum(p[t, e] * expert_forward(experts, xt[t:t + 1], int(e))[0] for e in top[t])
                           for t in range(xt.shape[0])])
        xt = xt + upd if inner else upd
    return xt


@pytest.mark.parametrize("residual", ["inner", "outer"])
def test_chain_of_experts_block_residual_modes(residual):
    """Official CoE: inner = norm(h) + updates, no outer residual; outer = h + chain, no inner
    residual. Before: the block returned h + norm(h) + updates (neither mode)."""
    block, layer = _coe_block(residual, zero_experts=False)
    x_att, h, out = _block_io(block)
    with torch.no_grad():
        chain = _chain_oracle(layer.router, layer.experts, h.reshape(10, D), inner=residual == "inner").view(2, 5, D)
    want = chain if residual == "inner" else x_att + chain
    torch.testing.assert_close(out.detach(), want, atol=1e-5, rtol=1e-5)


def test_chain_of_experts_with_zero_experts_passes_the_right_stream():
    """All-zero experts: inner mode outputs norm(h) (the chain's input), outer mode h."""
    for residual in ("inner", "outer"):
        block, _ = _coe_block(residual, zero_experts=True)
        x_att, h, out = _block_io(block)
        torch.testing.assert_close(out.detach(), h if residual == "inner" else x_att, atol=1e-6, rtol=1e-6)
    with pytest.raises(MoelabError, match="residual"):
        build_router(MoEConfig(d_model=D, router="chain_of_experts", router_kwargs={"residual": "both"}))
