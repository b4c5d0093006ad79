"""Skipping: identity at threshold 0, a loop oracle for the skipped output, the frontier search, MoDES scales."""

from __future__ import annotations

import copy

import pytest
import torch
from ops_helpers import Stack, moe_cfg

from moelab.errors import MoelabError
from moelab.layers.experts import expert_forward
from moelab.layers.moe import MoELayer
from moelab.models.moe_protocol import moe_layers
from moelab.ops.apply import layer_overrides
from moelab.ops.skip import SkipConfig, install_skipping, realised_rate, skip_model


def test_threshold_zero_is_the_identity(toy_model, windows):
    before = toy_model(windows.ids_NL).logits
    m = copy.deepcopy(toy_model)
    install_skipping(m, {0: 2.0, 1: 0.5}, threshold=0.0)
    assert all(s.layer.cfg.router == "wrapped" for s in moe_layers(m))
    assert torch.equal(m(windows.ids_NL).logits, before)


def test_skipped_output_equals_a_token_loop():
    torch.manual_seed(0)
    layer = MoELayer(moe_cfg())
    ref_layer = copy.deepcopy(layer)
    model = Stack([layer])
    install_skipping(model, {0: 1.5}, threshold=0.2)
    x = torch.randn(12, 16)
    y = model.blocks[0](x)
    p = torch.softmax(x @ ref_layer.router.gate.weight_ED.T, -1)
    w, idx = torch.topk(p, 2)
    w = w / w.sum(-1, keepdim=True)
    ref = torch.zeros_like(x)
    for t in range(12):
        for j in range(2):
            e = int(idx[t, j])
            if 1.5 * p[t, e] >= 0.2:
                ref[t] += w[t, j] * expert_forward(ref_layer.experts, x[t:t + 1], e)[0]
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    ept = model.blocks[0].last_stats["experts_per_token"]
    assert ept < 2.0 and ept == pytest.approx(float((1.5 * torch.gather(p, 1, idx) >= 0.2).sum()) / 12)


@pytest.mark.parametrize("method", ["threshold", "modes"])
def test_frontier_search_reaches_the_target_rate(toy_model, windows, method):
    m = copy.deepcopy(toy_model)
    man = skip_model(m, windows, SkipConfig(method=method, rate=0.4, search_batches=2, batch_size=4))
    assert man["realised_rate"] <= 0.4 and man["realised_rate"] > 0.3
    got, ept = realised_rate(m, windows, 2, 4)
    assert got == pytest.approx(man["realised_rate"])
    assert sum(ept.values()) / len(ept) < 2.0 and all(v <= 2.0 for v in ept.values())
    ov = layer_overrides(m, toy_model.cfg.layer_moe_config())
    assert ov["0"]["router_kwargs"]["skip_threshold"] == pytest.approx(man["threshold"])


def test_modes_scales_average_one_and_follow_layer_importance(toy_model, windows):
    from moelab.ops.skip.modes import layer_importance, modes

    kl = layer_importance(toy_model, windows, batch_size=4, n_batches=1)
    assert all(v > 0 for v in kl.values())
    sc = modes(toy_model, windows, batch_size=4, n_batches=1)
    assert sum(sc.values()) / len(sc) == pytest.approx(1.0)
    assert max(sc, key=sc.get) == max(kl, key=kl.get)
    assert all(s.layer.cfg.router == "softmax_topk" for s in moe_layers(toy_model))  # restored


def test_rate_zero_skips_nothing(toy_model, windows):
    before = toy_model(windows.ids_NL).logits
    m = copy.deepcopy(toy_model)
    man = skip_model(m, windows, SkipConfig(method="modes", rate=0.0, search_batches=1, batch_size=4))
    assert man["threshold"] == 0.0 and torch.equal(m(windows.ids_NL).logits, before)


@pytest.mark.parametrize("kw, match", [({"rate": 1.0}, "rate=1.0"), ({"rate": -0.1}, "rate"),
                                       ({"method": "dyn"}, "choose one of: 'modes', 'threshold'")])
def test_bad_skip_config(kw, match):
    with pytest.raises(MoelabError, match=match):
        SkipConfig(**kw).validate()


def test_wrapped_router_rejects_bad_map():
    with pytest.raises(MoelabError, match="expert_map"):
        MoELayer(moe_cfg(num_experts=2, router="wrapped", router_kwargs={"base_experts": 4, "expert_map": [0, 1, 2, 0]}))


def test_wrapped_router_outputs_and_gradients_match_a_dense_oracle():
    """Expert map (4 base experts -> 2) plus skipping, against a token loop on cloned leaf tensors."""
    torch.manual_seed(0)
    kw = {"base": "softmax_topk", "base_experts": 4, "expert_map": [1, 0, 1, 0], "skip_threshold": 0.15, "skip_scale": 1.2}
    layer = MoELayer(moe_cfg(num_experts=2, router="wrapped", router_kwargs=kw, aux_loss="none"))
    x = torch.randn(9, 16)
    y = layer(x)
    (y * torch.linspace(-1, 1, 16)).sum().backward()
    g_ED = layer.router.base.gate.weight_ED.detach().clone().requires_grad_()
    ws = {n: getattr(layer.experts, n).detach().clone().requires_grad_() for n in ("w_gate_EFD", "w_up_EFD", "w_down_EDF")}
    ref = []
    for t in range(9):
        p = torch.softmax(g_ED @ x[t], -1)
        top = torch.topk(p.detach(), 2).indices.tolist()
        wsum = p[top].sum()
        out = torch.zeros(16)
        for e in top:
            if 1.2 * float(p[e].detach()) >= 0.15:
                m = kw["expert_map"][e]
                h = torch.nn.functional.silu(ws["w_gate_EFD"][m] @ x[t]) * (ws["w_up_EFD"][m] @ x[t])
                out = out + p[e] / wsum * (ws["w_down_EDF"][m] @ h)
        ref.append(out)
    ref = torch.stack(ref)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    (ref * torch.linspace(-1, 1, 16)).sum().backward()
    torch.testing.assert_close(layer.router.base.gate.weight_ED.grad, g_ED.grad, rtol=1e-4, atol=1e-6)
    for n, w in ws.items():
        torch.testing.assert_close(getattr(layer.experts, n).grad, w.grad, rtol=1e-4, atol=1e-6)
