"""Layer options added for Hugging Face import: softmax_topk router bias, BiasedExpertBank
(expert biases, GPT-OSS clamped SwiGLU) and the MoELayer ``forward_routed`` seam."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.layers.experts import expert_forward
from moelab.layers.experts_ext import BiasedExpertBank
from moelab.layers.moe import MoELayer
from moelab.layers.routers import build_router

CFG = MoEConfig(d_model=16, d_ff=24, num_experts=4, k=2)


def test_router_bias_default_off_is_bit_identical():
    torch.manual_seed(0)
    a = build_router(CFG)
    torch.manual_seed(0)
    b = build_router(MoEConfig(**{**CFG.to_dict(), "router_kwargs": {"bias": False}}))
    assert "bias_E" not in dict(a.named_parameters())
    x = torch.randn(9, 16)
    ra, rb = a(x), b(x)
    assert torch.equal(ra.weight_S, rb.weight_S) and torch.equal(ra.expert_S, rb.expert_S)


def test_router_bias_topk_then_softmax_matches_gpt_oss_formula():
    cfg = MoEConfig(**{**CFG.to_dict(), "router_kwargs": {"bias": True, "score_order": "topk_then_softmax"}})
    r = build_router(cfg)
    with torch.no_grad():
        r.bias_E.copy_(torch.tensor([3.0, -3.0, 0.5, 0.0]))
    x = torch.randn(11, 16, requires_grad=True)
    out = r(x)
    logits = x @ r.gate.weight_ED.T + r.bias_E  # oracle: Linear with bias, top-k, softmax over k
    val, idx = logits.topk(2, dim=-1)
    idx_TK, w_TK, _ = out.topk_view()
    assert torch.equal(idx_TK.sort(-1).values, idx.sort(-1).values)
    ref = torch.softmax(val, -1)
    got = out.dense_TE().gather(1, idx)
    torch.testing.assert_close(got, ref)
    (got * torch.arange(2.0)).sum().backward()
    assert r.bias_E.grad is not None and r.bias_E.grad.abs().sum() > 0
    with pytest.raises(MoelabError, match="bias"):
        build_router(MoEConfig(**{**CFG.to_dict(), "router_kwargs": {"bias": "yes"}}))


def _oracle(bank: BiasedExpertBank, x, e):
    g = x @ bank.w_gate_EFD[e].T + bank.b_gate_EF[e]
    u = x @ bank.w_up_EFD[e].T + bank.b_up_EF[e]
    if bank.limit is not None:
        g, u = g.clamp(max=bank.limit), u.clamp(-bank.limit, bank.limit)
    return (g * torch.sigmoid(bank.alpha * g) * (u + bank.up_shift)) @ bank.w_down_EDF[e].T + bank.b_down_ED[e]


def test_biased_bank_defaults_equal_plain_swiglu():
    torch.manual_seed(1)
    layer = MoELayer(CFG)
    bank = BiasedExpertBank(CFG)
    with torch.no_grad():
        for n in ("w_gate_EFD", "w_up_EFD", "w_down_EDF"):
            getattr(bank, n).copy_(getattr(layer.experts, n))
    x = torch.randn(7, 16)
    torch.testing.assert_close(bank.expert(x, 2), expert_forward(layer.experts, x, 2))


def test_biased_bank_in_layer_matches_loop_oracle_outputs_and_grads():
    torch.manual_seed(2)
    bank = BiasedExpertBank(CFG, alpha=1.702, limit=0.05, up_shift=1.0)
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(0, 0.3)
    layer = MoELayer(MoEConfig(**{**CFG.to_dict(), "aux_loss": "none"}), experts=bank)
    x = torch.randn(13, 16, requires_grad=True)
    y = layer(x)
    dense = layer.last_routing.dense_TE()
    w = layer.router(x).dense_TE()
    ref = sum(w[:, e:e + 1] * _oracle(bank, x, e) for e in range(4))
    torch.testing.assert_close(y, ref)
    assert torch.equal(dense > 0, w > 0)
    g = torch.randn_like(y)
    gy = torch.autograd.grad((y * g).sum(), [x, bank.b_up_EF], retain_graph=True)
    gr = torch.autograd.grad((ref * g).sum(), [x, bank.b_up_EF])
    torch.testing.assert_close(gy[0], gr[0])
    torch.testing.assert_close(gy[1], gr[1])
    assert bool(((_oracle(bank, x, 0) - _oracle(BiasedExpertBank(CFG), x, 0)).abs() > 0).any())


def test_biased_bank_rejects_bad_options():
    with pytest.raises(MoelabError, match="limit"):
        BiasedExpertBank(CFG, limit=-1.0)
    with pytest.raises(MoelabError, match="activation"):
        BiasedExpertBank(MoEConfig(**{**CFG.to_dict(), "activation": "gelu"}))
