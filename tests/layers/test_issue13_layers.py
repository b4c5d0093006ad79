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
    moe = MoEConfig(d_model=D, d_ff=24, num_experts=4, k=2, router="chain_of_experts", init_std=0.3, aux_loss="none",
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
    from moelab.models.transformer import rope_tables

    block, layer = _coe_block(residual, zero_experts=False)
    cos, sin = rope_tables(D // 2, 8, 10000.0)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3), requires_grad=True)
    out = block(x, cos, sin, RoutingContext(batch_shape=(2, 5), state={}))
    x2 = x.detach().clone().requires_grad_(True)  # oracle: the block's pieces, the chain as a loop
    x_att = x2 + block.attn(block.attn_norm(x2), cos, sin)
    chain = _chain_oracle(layer.router, layer.experts, block.ffn_norm(x_att).reshape(10, D),
                          inner=residual == "inner").view(2, 5, D)
    want = chain if residual == "inner" else x_att + chain
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    g = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(4))
    (out * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-4)


def test_chain_of_experts_with_zero_experts_passes_the_right_stream():
    """All-zero experts: inner mode outputs norm(h) (the chain's input), outer mode h."""
    for residual in ("inner", "outer"):
        block, _ = _coe_block(residual, zero_experts=True)
        x_att, h, out = _block_io(block)
        torch.testing.assert_close(out.detach(), h if residual == "inner" else x_att, atol=1e-6, rtol=1e-6)
    with pytest.raises(MoelabError, match="residual"):
        build_router(MoEConfig(d_model=D, router="chain_of_experts", router_kwargs={"residual": "both"}))


# ----------------------------------------------------------------- group-limited routing with a bias
def deepseek_v3_gate(x, weight, bias, n_groups, topk_groups, k, route_scale):
    """DeepSeek-V3's inference ``Gate.forward`` (deepseek-ai/DeepSeek-V3, inference/model.py), sigmoid
    scores, written out: groups scored on the *biased* scores by the sum of their top-2, the best
    ``topk_groups`` kept, top-k of the biased scores inside them, weights from the unbiased scores
    renormalised, times ``route_scale``."""
    scores = torch.sigmoid(x @ weight.T)
    original = scores
    s = (scores + bias).view(x.shape[0], n_groups, -1)
    group_scores = s.topk(2, dim=-1)[0].sum(dim=-1)
    keep = group_scores.topk(topk_groups, dim=-1)[1]
    mask = torch.ones(x.shape[0], n_groups, dtype=torch.bool).scatter_(1, keep, False)
    s = s.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
    idx = s.topk(k, dim=-1)[1]
    w = original.gather(1, idx)
    return w / w.sum(-1, keepdim=True) * route_scale, idx


def test_group_limited_routing_with_bias_matches_deepseek_v3_gate():
    torch.manual_seed(0)
    E, G, TG, K = 16, 4, 2, 4
    cfg = MoEConfig(d_model=D, num_experts=E, k=K, router="sigmoid_topk", aux_free_bias=True, init_std=0.5,
                    router_kwargs={"n_groups": G, "topk_groups": TG, "route_scale": 2.5})
    router = build_router(cfg)
    bias = torch.randn(E, generator=torch.Generator().manual_seed(1)) * 0.3
    router.aux_free.bias_E.copy_(bias)
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(2))
    r = router.eval()(x)
    w_ref, idx_ref = deepseek_v3_gate(x, router.gate.weight_ED.detach(), bias, G, TG, K, 2.5)
    idx = r.expert_S.view(64, K)
    order, order_ref = idx.argsort(-1), idx_ref.argsort(-1)
    assert torch.equal(idx.gather(1, order), idx_ref.gather(1, order_ref))
    torch.testing.assert_close(r.weight_S.view(64, K).detach().gather(1, order), w_ref.gather(1, order_ref))
    # the bias matters here: without it the groups (and experts) chosen differ for some tokens
    _, idx_nobias = deepseek_v3_gate(x, router.gate.weight_ED.detach(), torch.zeros(E), G, TG, K, 2.5)
    assert not torch.equal(idx_nobias.sort(-1).values, idx_ref.sort(-1).values)


# ----------------------------------------------------------------- never fail silently (section 3)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_moe_layer_input_dtype_other_than_the_parameters_is_a_named_error(dtype):
    layer = MoELayer(MoEConfig(d_model=8, d_ff=16, num_experts=4, k=2))
    with pytest.raises(MoelabError, match=f"x has dtype {dtype}.*torch.float32"):
        layer(torch.randn(5, 8, dtype=dtype))


def test_moe_layer_in_float64_matches_float32():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=16, num_experts=4, k=2))
    x = torch.randn(7, 8)
    y32 = layer(x).detach()
    y64 = copy.deepcopy(layer).double()(x.double()).detach()
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y32, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts per op: allowed
        assert layer(x.bfloat16()).shape == (7, 8)


@pytest.mark.parametrize("router", sorted(__import__("moelab.layers.routers", fromlist=["ROUTERS"]).ROUTERS.names()))
def test_moe_layer_on_zero_tokens_reports_finite_losses(router):
    """Before: every router with a Switch loss reported aux_loss = NaN (0/0); SMEAR raised a raw
    reshape error. Now: an empty output and finite (zero) losses."""
    layer = MoELayer(MoEConfig(d_model=8, d_ff=16, num_experts=4, k=2, router=router, z_loss_coef=0.1))
    x = torch.randn(0, 5, 8, requires_grad=True)
    y = layer(x, RoutingContext(batch_shape=(0, 5), token_ids_T=torch.zeros(0, dtype=torch.long)))
    assert y.shape == (0, 5, 8)
    assert all(bool(torch.isfinite(v)) for v in layer.last_aux.values()), layer.last_aux
    assert all(float(v) == 0.0 for k, v in layer.last_aux.items() if k in ("aux_loss", "z_loss"))
    y.sum().backward()
