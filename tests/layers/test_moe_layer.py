"""MoELayer: composition, oracles (E=1 is the dense FFN, every backend equals loop), the aux-loss
attachment (the balance loss trains the router through a loss on the output alone), seams."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.layers.experts import ExpertBank
from moelab.layers.moe import MoELayer
from moelab.layers.routing import RoutingResult


def cfg_(**kw):
    base = dict(d_model=32, d_ff=48, num_experts=6, k=2, init_std=0.2, aux_loss_coef=0.1, z_loss_coef=0.01)
    base.update(kw)
    return MoEConfig(**base)


def grads_of(layer, x, loss_fn=lambda y: (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    loss_fn(y).backward()
    out = {"y": y.detach(), "dx": x.grad}
    out.update({n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None})
    return out


@pytest.mark.parametrize("dispatch", ["sorted", "grouped", "auto"])
@pytest.mark.parametrize("extra", [{}, {"num_shared_experts": 1, "shared_expert_gate": True}, {"k": 3, "d_model": 100, "d_ff": 600}])
def test_layer_backends_match_loop(dispatch, extra):
    torch.manual_seed(0)
    ref_layer = MoELayer(cfg_(dispatch="loop", **extra))
    layer = copy.deepcopy(ref_layer)
    layer.cfg = replace(layer.cfg, dispatch=dispatch)
    x = torch.randn(3, 5, ref_layer.cfg.d_model)
    a, b = grads_of(layer, x), grads_of(ref_layer, x)
    assert set(a) == set(b) and any(k.startswith("router") for k in b)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5 * float(b[k].abs().max()), msg=k)


def test_one_expert_equals_dense_swiglu():
    torch.manual_seed(0)
    layer = MoELayer(cfg_(num_experts=1, k=1, aux_loss="none", z_loss_coef=0.0))
    x = torch.randn(4, 7, 32)
    bank = layer.experts
    ref = (F.silu(x @ bank.w_gate_EFD[0].T) * (x @ bank.w_up_EFD[0].T)) @ bank.w_down_EDF[0].T
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6)


def test_capacity_infinite_equals_dropless_and_small_capacity_drops():
    torch.manual_seed(0)
    dropless = MoELayer(cfg_())
    inf = copy.deepcopy(dropless)
    inf.cfg = replace(inf.cfg, capacity_factor=math.inf, dispatch="capacity")
    x = torch.randn(40, 32)
    a, b = grads_of(inf, x), grads_of(dropless, x)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    small = copy.deepcopy(dropless)
    small.cfg = replace(small.cfg, capacity_factor=0.5)
    small(x)
    assert small.last_stats["dropped_frac"] >= 1 - 6 * math.ceil(0.5 * 80 / 6) / 80 - 1e-9
    assert max(small.last_stats["counts"]) <= math.ceil(0.5 * 80 / 6)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_aux_loss_gradient_reaches_router_through_output_alone(scale):
    torch.manual_seed(0)
    layer = MoELayer(cfg_())
    layer.aux_loss_scale = scale
    x = torch.randn(30, 32)
    w = torch.randn(30, 32)
    got = grads_of(layer, x, lambda y: (y * w).sum())
    # reference: the same computation with the aux loss added explicitly
    layer.zero_grad(set_to_none=True)
    routing = layer.route(x, None)
    y = layer.dispatch(x, routing)
    aux = layer.balance(routing, None)
    assert set(aux) == {"aux_loss", "z_loss"}
    ((y * w).sum() + scale * sum(aux.values())).backward()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-8, msg=n)
    # and the aux loss matters: without it the router gradient differs
    layer.zero_grad(set_to_none=True)
    routing = layer.route(x, None)
    (layer.dispatch(x, routing) * w).sum().backward()
    name = next(n for n, _ in layer.named_parameters() if n.startswith("router"))
    assert not torch.allclose(dict(layer.named_parameters())[name].grad, got[name])


def test_last_outputs_are_detached_and_complete():
    layer = MoELayer(cfg_())
    x = torch.randn(2, 8, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    r = layer.last_routing
    assert isinstance(r, RoutingResult) and not r.weight_S.requires_grad and r.num_tokens == 16
    assert set(layer.last_aux) == {"aux_loss", "z_loss"}
    assert all(not v.requires_grad and v.dim() == 0 for v in layer.last_aux.values())
    assert sum(layer.last_stats["counts"]) == 32
    with torch.no_grad():
        layer(x)  # no graph, no attachment, still records
    assert layer.last_stats["experts_per_token"] == 2.0


def test_shared_bank_is_used_by_many_layers():
    cfg = cfg_()
    bank = ExpertBank(cfg)
    l1, l2 = MoELayer(cfg, experts=bank), MoELayer(cfg, experts=bank)
    assert l1.experts is l2.experts
    x = torch.randn(10, 32)
    (l1(x).sum() + l2(x).sum()).backward()
    assert bank.w_up_EFD.grad is not None
    with pytest.raises(MoelabError, match="num_experts"):
        MoELayer(cfg_(num_experts=4), experts=bank)


def test_forward_layer_seam_is_used():
    layer = MoELayer(cfg_(aux_loss="none", z_loss_coef=0.0))
    calls = []

    def forward_layer(lay, x_TD, ctx):
        calls.append(x_TD.shape)
        T = x_TD.shape[0]
        r = RoutingResult.from_topk(torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1), 6)
        return 2 * x_TD, r

    layer.router.forward_layer = forward_layer
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(layer(x), 2 * x)
    assert calls == [(6, 32)] and layer.last_stats["counts"][0] == 6


@pytest.mark.parametrize("kw,match", [
    ({"capacity_factor": 0.0}, "capacity_factor"),
    ({"capacity_factor": -2.0}, "capacity_factor"),
    ({"dispatch": "fastest"}, "dispatch.*grouped"),
    ({"dispatch": "capacity"}, "capacity_factor"),
    ({"drop_policy": "random"}, "drop_policy"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(MoelabError, match=match):
        MoELayer(cfg_(**kw))


def test_wrong_input_dims_raise():
    layer = MoELayer(cfg_())
    with pytest.raises(MoelabError, match="d_model=32"):
        layer(torch.randn(4, 31))
    with pytest.raises(MoelabError, match="dtype"):
        layer(torch.ones(4, 32, dtype=torch.long))
