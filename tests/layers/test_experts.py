"""ExpertBank / SharedExperts: shapes, documented init, and the per-expert formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.layers.experts import ExpertBank, SharedExperts, expert_forward


def test_swiglu_bank_shapes_and_init():
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=64, d_ff=96, num_experts=8, init_std=0.05)
    bank = ExpertBank(cfg, num_layers=4)
    assert bank.w_gate_EFD.shape == (8, 96, 64) and bank.w_up_EFD.shape == (8, 96, 64)
    assert bank.w_down_EDF.shape == (8, 64, 96)
    assert bank.w_up_EFD.std().item() == pytest.approx(0.05, rel=0.05)
    assert bank.w_down_EDF.std().item() == pytest.approx(0.05 / math.sqrt(8), rel=0.05)


def test_gelu_bank_has_no_gate():
    bank = ExpertBank(MoEConfig(d_model=16, d_ff=32, num_experts=3, activation="gelu"))
    assert bank.w_gate_EFD is None
    assert sorted(n for n, _ in bank.named_parameters()) == ["w_down_EDF", "w_up_EFD"]
    x = torch.randn(5, 16)
    ref = F.gelu(x @ bank.w_up_EFD[1].T) @ bank.w_down_EDF[1].T
    torch.testing.assert_close(expert_forward(bank, x, 1), ref)


def test_expert_forward_is_swiglu_of_that_expert():
    bank = ExpertBank(MoEConfig(d_model=16, d_ff=32, num_experts=3))
    x = torch.randn(5, 16)
    e = 2
    ref = (F.silu(x @ bank.w_gate_EFD[e].T) * (x @ bank.w_up_EFD[e].T)) @ bank.w_down_EDF[e].T
    torch.testing.assert_close(expert_forward(bank, x, e), ref)
    with pytest.raises(MoelabError, match="e=3"):
        expert_forward(bank, x, 3)


def test_fine_grained_segmentation_keeps_active_params():
    cfg = MoEConfig(d_model=32, d_ff=128, num_experts=4, k=2)
    fg = cfg.fine_grained(4)
    assert (fg.num_experts, fg.k, fg.d_ff) == (16, 8, 32)
    assert fg.k * fg.d_ff == cfg.k * cfg.d_ff
    b, bf = ExpertBank(cfg), ExpertBank(fg)
    assert sum(p.numel() for p in b.parameters()) == sum(p.numel() for p in bf.parameters())


def test_shared_experts_equal_sum_of_separate_ffns():
    cfg = MoEConfig(d_model=16, d_ff=24, num_experts=4, num_shared_experts=2, shared_d_ff=10)
    sh = SharedExperts(cfg)
    assert sh.w_up_FD.shape == (20, 16)
    x = torch.randn(7, 16)
    ref = 0
    for i in range(2):
        s = slice(10 * i, 10 * (i + 1))
        ref = ref + (F.silu(x @ sh.w_gate_FD[s].T) * (x @ sh.w_up_FD[s].T)) @ sh.w_down_DF[:, s].T
    torch.testing.assert_close(sh(x), ref, rtol=1e-5, atol=1e-6)


def test_shared_expert_sigmoid_gate():
    cfg = MoEConfig(d_model=16, d_ff=24, num_experts=4, num_shared_experts=1, shared_expert_gate=True)
    sh = SharedExperts(cfg)
    x = torch.randn(7, 16)
    ungated = (F.silu(x @ sh.w_gate_FD.T) * (x @ sh.w_up_FD.T)) @ sh.w_down_DF.T
    torch.testing.assert_close(sh(x), torch.sigmoid(x @ sh.w_sgate_1D.T) * ungated)


@pytest.mark.parametrize("field,value", [("activation", "relu"), ("d_ff", 0), ("init_std", 0.0)])
def test_bad_config_raises(field, value):
    cfg = MoEConfig(d_model=16, d_ff=24, num_experts=4)
    setattr(cfg, field, value)
    with pytest.raises(MoelabError, match=field):
        ExpertBank(cfg)
