"""Upcycling recipes: function preservation against the dense (or source) model, outputs and gradients;
the dense-FFN seam on an HF-style MLP; Drop-Upcycling; grow; config persistence; bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.layers.moe import MoELayer
from moelab.models.config import ModelConfig
from moelab.models.moe_protocol import moe_layers
from moelab.models.transformer import MoETransformer
from moelab.ops.upcycle import UPCYCLE_CONFIGS, UPCYCLERS
from moelab.ops.upcycle.common import persist_model_config
from moelab.ops.upcycle.dense import dense_ffn_sites
from moelab.ops.upcycle.grow import allocate_copies, expert_utility


def dense_model(n_layers=3, d_ff=64, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=n_layers, n_heads=2, d_ff_dense=d_ff, moe_layers="none")
    return cfg, MoETransformer(cfg)


def logits_and_embed_grad(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels_BL=ids.roll(-1, 1))
    out.lm_loss.backward()
    return out.logits.detach(), model.embed.weight.grad.clone()


NO_AUX = MoEConfig(aux_loss="none")  # the balance loss's gradient would reach the input too


def upcycle(model, method, template=NO_AUX, **kw):
    model = copy.deepcopy(model)
    UPCYCLERS.get(method)(model, UPCYCLE_CONFIGS[method](**kw), template=template)
    return model


PRESERVING = [
    ("sparse", dict(num_experts=4, k=2)),
    ("sparse", dict(num_experts=8, k=3, every=2)),
    ("sparse", dict(num_experts=4, k=2, num_shared_experts=1)),
    ("sparse", dict(num_experts=4, k=2, num_shared_experts=2, shared_fraction=0.25, layers=[0, 2])),
    ("granular", dict(num_experts=8, k=2, granularity=2)),
    ("granular", dict(num_experts=8, k=4, granularity=4)),
    ("granular", dict(num_experts=4, k=2, granularity=2, num_shared_experts=1)),
]


@pytest.mark.parametrize("method,kw", PRESERVING)
def test_upcycled_model_equals_dense_at_step0(method, kw):
    cfg, dense = dense_model()
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grad = logits_and_embed_grad(dense, ids)
    up = upcycle(dense, method, **kw)
    assert moe_layers(up), "no MoE layer was created"
    logits, grad = logits_and_embed_grad(up, ids)
    assert (logits - ref_logits).abs().max() <= 1e-5
    assert torch.allclose(grad, ref_grad, atol=1e-6, rtol=1e-4)  # same function => same input gradient
    # the persisted config rebuilds exactly this model
    rebuilt = MoETransformer(persist_model_config(cfg, up))
    rebuilt.load_state_dict(up.state_dict())
    assert (rebuilt(ids).logits - ref_logits).abs().max() <= 1e-5


def test_every_nth_layer_and_shards():
    cfg, dense = dense_model(n_layers=4)
    up = upcycle(dense, "granular", num_experts=4, k=2, granularity=2, every=2)
    assert [s.index for s in moe_layers(up)] == [1, 3]
    assert [s.index for s in dense_ffn_sites(up)] == [0, 2]
    bank = moe_layers(up)[0].layer.experts
    gate_FD, _ = dense.blocks[1].ffn.w_gate_up.weight.chunk(2, dim=0)
    assert torch.equal(bank.w_gate_EFD[1], gate_FD[32:]) and torch.equal(bank.w_gate_EFD[2], gate_FD[:32])
    assert moe_layers(up)[0].layer.cfg.routed_scale == 2


def test_k1_is_not_preserving_but_runs():
    """Documented: with k=1 the combine weight is the raw probability (< 1)."""
    _, dense = dense_model()
    ids = torch.randint(0, 64, (2, 7))
    up = upcycle(dense, "sparse", num_experts=4, k=1, router_init_std=0.0)
    ratio_out = up(ids).logits
    assert not torch.allclose(ratio_out, dense(ids).logits, atol=1e-4)


def test_drop_upcycling_redraws_the_given_fraction():
    _, dense = dense_model(d_ff=64)
    up = upcycle(dense, "sparse", num_experts=4, k=2, drop_ratio=0.25, seed=3)
    gate_FD, up_FD = dense.blocks[0].ffn.w_gate_up.weight.chunk(2, dim=0)
    bank = moe_layers(up)[0].layer.experts
    changed = [int((bank.w_gate_EFD[e] != gate_FD).any(1).sum()) for e in range(4)]
    assert changed == [16] * 4  # round(0.25 * 64) hidden units per expert
    rows = [(bank.w_up_EFD[e] != up_FD).any(1) for e in range(4)]
    assert not torch.equal(rows[0], rows[1])  # each expert re-draws its own units
    down_cols = (bank.w_down_EDF[0] != dense.blocks[0].ffn.w_down.weight).any(0)
    assert torch.equal(down_cols, rows[0])  # the same units in down


class HFStyleMLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HFStyleLayer(nn.Module):
    def __init__(self, i, d, f):
        super().__init__()
        self.layer_idx, self.mlp = i, HFStyleMLP(d, f)

    def forward(self, x):
        return x + self.mlp(x)


def test_seam_upcycles_an_hf_style_model():
    torch.manual_seed(0)
    model = nn.Sequential(*[HFStyleLayer(i, 16, 32) for i in range(2)])
    x = torch.randn(2, 5, 16)
    ref = model(x)
    up = upcycle(model, "granular", num_experts=4, k=2, granularity=2)
    assert [s.index for s in moe_layers(up)] == [0, 1]
    assert (up(x) - ref).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- grow


def moe_model(E=4, k=2, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff_dense=64,
                      moe=MoEConfig(d_ff=32, num_experts=E, k=k, aux_loss="none"))
    return cfg, MoETransformer(cfg)


def grow(model, utility=None, **kw):
    model = copy.deepcopy(model)
    UPCYCLERS.get("grow")(model, UPCYCLE_CONFIGS["grow"](**kw), utility=utility)
    return model


def test_grow_phased_equals_source_at_step0():
    cfg, src = moe_model()
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(2))
    ref_logits, ref_grad = logits_and_embed_grad(src, ids)
    g = grow(src, mode="phased", factor=2, perturb=0.1)
    logits, grad = logits_and_embed_grad(g, ids)
    assert all(s.layer.cfg.num_experts == 8 and s.layer.cfg.k == 2 for s in moe_layers(g))
    assert (logits - ref_logits).abs().max() <= 1e-5
    assert torch.allclose(grad, ref_grad, atol=1e-6, rtol=1e-4)
    rebuilt = MoETransformer(persist_model_config(cfg, g))
    rebuilt.load_state_dict(g.state_dict())
    assert (rebuilt(ids).logits - ref_logits).abs().max() <= 1e-5


def test_grow_copy_duplicates_experts_and_perturbs_router_rows():
    _, src = moe_model()
    g = grow(src, mode="copy", factor=2, perturb=0.01)
    old, new = moe_layers(src)[0].layer, moe_layers(g)[0].layer
    assert torch.equal(new.experts.w_up_EFD[4:], old.experts.w_up_EFD)  # uniform: copy e -> slot 4 + e
    w_old, w_new = old.router.gate.weight_ED, new.router.gate.weight_ED
    assert torch.equal(w_new[:4], w_old)
    rel = (w_new[4:] - w_old).norm(dim=1) / w_old.std(dim=1) / 32 ** 0.5
    assert (rel > 0).all() and (rel < 0.03).all()


def test_grow_copy_changes_function_a_little():
    """The paper's operator with k fixed is not exactly function-preserving (documented)."""
    _, src = moe_model()
    ids = torch.randint(0, 64, (3, 9))
    d = (grow(src, mode="copy", perturb=0.0)(ids).logits - src(ids).logits).abs().max()
    assert 1e-5 < d < 1.0


def test_allocate_copies_by_utility_matches_hand_computed():
    # 4 experts -> 8: 4 extra slots shared 0.5/0.25/0.25/0 -> 2, 1, 1, 0
    assert allocate_copies(torch.tensor([2.0, 1.0, 1.0, 0.0]), 4, 8) == [0, 1, 2, 3, 0, 0, 1, 2]
    assert allocate_copies(None, 4, 10) == [0, 1, 2, 3, 0, 0, 1, 1, 2, 3]


def test_expert_utility_is_taylor_importance():
    _, src = moe_model()
    ids = torch.randint(0, 64, (2, 9))
    u = expert_utility(src, [(ids, ids)])
    src.zero_grad()
    src(ids, labels_BL=ids).lm_loss.backward()
    bank = moe_layers(src)[1].layer.experts
    e = 2
    oracle = sum(float((getattr(bank, n)[e].detach() * getattr(bank, n).grad[e]).sum()) for n in
                 ("w_gate_EFD", "w_up_EFD", "w_down_EDF"))
    assert float(u[1][e]) == pytest.approx(abs(oracle), rel=1e-5)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("method,model,kw,match", [
    ("sparse", "moe", dict(num_experts=8), "already MoE"),
    ("granular", "moe", dict(num_experts=8), "already MoE"),
    ("sparse", "dense", dict(num_experts=4, k=5), "k=5"),
    ("sparse", "dense", dict(num_experts=4, layers=[7]), "layers="),
    ("granular", "dense", dict(num_experts=6, k=2, granularity=4), "num_experts=6"),
    ("granular", "dense", dict(num_experts=8, k=3, granularity=2), "k=3"),
    ("sparse", "dense", dict(drop_ratio=1.5), "drop_ratio"),
    ("grow", "dense", dict(factor=2), "dense model"),
    ("grow", "moe", dict(num_experts=2), "num_experts=2 is smaller"),
    ("grow", "moe", dict(mode="sideways"), "mode="),
    ("grow", "moe", dict(utility=True), "utility"),
])
def test_bad_input_names_the_option(method, model, kw, match):
    m = dense_model()[1] if model == "dense" else moe_model()[1]
    with pytest.raises(MoelabError, match=match):
        UPCYCLERS.get(method)(m, UPCYCLE_CONFIGS[method](**kw))


def test_granular_must_divide_ffn_width():
    _, dense = dense_model(d_ff=60)
    with pytest.raises(MoelabError, match="granularity=8 must divide"):
        UPCYCLERS.get("granular")(dense, UPCYCLE_CONFIGS["granular"](num_experts=8, k=8, granularity=8))


def test_router_other_than_softmax_topk_is_refused():
    _, dense = dense_model()
    with pytest.raises(MoelabError, match="router='sigmoid_topk'"):
        UPCYCLERS.get("sparse")(dense, UPCYCLE_CONFIGS["sparse"](), template=MoEConfig(router="sigmoid_topk"))


def test_routed_scale_multiplies_only_the_routed_output():
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_ff=8, num_experts=4, k=2, num_shared_experts=1, aux_loss="none")
    plain = MoELayer(cfg)
    scaled = MoELayer(MoEConfig(**{**cfg.to_dict(), "routed_scale": 3.0}))
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(5, 16)
    shared = plain.shared_experts(x)
    assert torch.allclose(scaled(x) - shared, 3.0 * (plain(x) - shared), atol=1e-6)
    with pytest.raises(MoelabError, match="routed_scale"):
        MoELayer(MoEConfig(routed_scale=0.0))
