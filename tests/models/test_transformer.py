"""MoETransformer: oracles for attention/RoPE, causality, routing context, losses, counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_standin import StandinMoE
from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.models.config import ModelConfig
from moelab.models.transformer import Attention, MoETransformer, apply_rope, rope_tables


def micro(**kw) -> ModelConfig:
    base = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, d_ff_dense=48,
                moe=MoEConfig(d_model=32, d_ff=24, num_experts=4, k=2))
    base.update(kw)
    return ModelConfig(**base)


def standin_model(cfg, attach=True, seed=0):
    torch.manual_seed(seed)
    return MoETransformer(cfg, moe_factory=lambda c: StandinMoE(c, attach=attach))


@pytest.mark.parametrize(
    "spec, first_k, expected",
    [("all", 0, [0, 1, 2, 3, 4, 5]), ("none", 0, []), (1, 0, [0, 1, 2, 3, 4, 5]), (2, 0, [1, 3, 5]),
     (3, 0, [2, 5]), ([0, 4], 0, [0, 4]), ("all", 2, [2, 3, 4, 5]), (2, 2, [3, 5])],
)
def test_moe_layer_selection(spec, first_k, expected):
    cfg = micro(n_layers=6, moe_layers=spec, first_k_dense=first_k)
    assert cfg.moe_layer_indices() == expected
    model = standin_model(cfg)
    assert [i for i, _ in model.moe_layers()] == expected
    assert all(isinstance(layer, StandinMoE) for _, layer in model.moe_layers())


@pytest.mark.parametrize("bad", [dict(moe_layers="some"), dict(moe_layers=0), dict(moe_layers=[7]),
                                 dict(d_model=30), dict(moe=MoEConfig(num_experts=4, k=5))])
def test_invalid_config_names_parameter(bad):
    with pytest.raises(MoelabError, match="moe"if "moe" in str(bad) else "model"):
        micro(n_layers=2, **bad).validate()


def test_rope_matches_complex_rotation():
    Dh, L = 8, 5
    cos, sin = rope_tables(Dh, L, 10000.0)
    x = torch.randn(2, L, Dh)
    # oracle: pair (i, i+Dh/2) is the complex number x_i + j x_{i+Dh/2}, rotated by pos * theta^(-2i/Dh)
    z = torch.complex(x[..., : Dh // 2].double(), x[..., Dh // 2 :].double())
    freq = 10000.0 ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    rot = torch.polar(torch.ones(L, Dh // 2, dtype=torch.float64), torch.arange(L).double()[:, None] * freq)
    expect = torch.cat([(z * rot).real, (z * rot).imag], -1).float()
    torch.testing.assert_close(apply_rope(x, cos, sin), expect, atol=1e-5, rtol=1e-5)


def test_attention_matches_loop_oracle():
    torch.manual_seed(0)
    cfg = micro()
    attn = Attention(cfg)
    B, L, D, H = 2, 7, cfg.d_model, cfg.n_heads
    Dh = D // H
    cos, sin = rope_tables(Dh, cfg.max_seq_len, cfg.rope_theta)
    x = torch.randn(B, L, D, requires_grad=True)
    y = attn(x, cos, sin)
    # oracle: per batch, head and query position, a softmax over the keys at positions <= query
    q, k, v = (x @ attn.qkv.weight.T).split(D, dim=-1)
    out = torch.zeros(B, L, D)
    for b in range(B):
        for h in range(H):
            sl = slice(h * Dh, (h + 1) * Dh)
            qh = apply_rope(q[b, :, sl], cos[:L], sin[:L])
            kh = apply_rope(k[b, :, sl], cos[:L], sin[:L])
            for t in range(L):
                s = (kh[: t + 1] @ qh[t]) / math.sqrt(Dh)
                out[b, t, sl] = torch.softmax(s, 0) @ v[b, : t + 1, sl]
    expect = out @ attn.o_proj.weight.T
    torch.testing.assert_close(y, expect, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g, retain_graph=True)
    (gx_ref,) = torch.autograd.grad(expect, x, g)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("moe_layers", ["none", "all"])
def test_causal(moe_layers):
    model = standin_model(micro(moe_layers=moe_layers)).eval()
    ids = torch.randint(0, 50, (2, 10))
    ids2 = ids.clone()
    ids2[:, 6:] = torch.randint(0, 50, (2, 4))
    with torch.no_grad():
        a, b = model(ids).logits, model(ids2).logits
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_routing_context_passed_to_every_moe_layer():
    model = standin_model(micro(n_layers=3, moe_layers=[0, 2]))
    ids = torch.randint(0, 50, (2, 5))
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 3:] = False
    model(ids, labels_BL=ids, valid_BL=valid)
    ctxs = [layer.last_ctx for _, layer in model.moe_layers()]
    assert [c.layer_index for c in ctxs] == [0, 2]
    for c in ctxs:
        assert c.batch_shape == (2, 5)
        assert torch.equal(c.token_ids_T, ids.reshape(-1))
        assert torch.equal(c.valid_T, valid.reshape(-1))
    assert ctxs[0].state is ctxs[1].state  # one shared state dict per forward
    model(ids)
    assert model.blocks[0].ffn.last_ctx.state is not ctxs[0].state  # fresh every forward


def test_lm_loss_is_masked_cross_entropy():
    model = standin_model(micro(moe_layers="none"))
    ids = torch.randint(0, 50, (3, 8))
    labels = torch.randint(0, 50, (3, 8))
    valid = torch.rand(3, 8) > 0.3
    out = model(ids, labels_BL=labels, valid_BL=valid)
    expect = F.cross_entropy(out.logits[valid], labels[valid])
    torch.testing.assert_close(out.lm_loss, expect)
    assert float(out.aux_loss) == 0.0


def test_aux_loss_reported_and_not_double_counted():
    """Backprop of out.loss with attached aux == backprop of lm_loss + aux added by hand."""
    cfg = micro()
    ids = torch.randint(0, 50, (2, 8))
    attached = standin_model(cfg, attach=True)
    manual = standin_model(cfg, attach=False)
    manual.load_state_dict(attached.state_dict())
    out = attached(ids, labels_BL=ids)
    out.loss.backward()
    out_m = manual(ids, labels_BL=ids)
    aux_graph = sum(layer.aux_graph for _, layer in manual.moe_layers())
    (out_m.lm_loss + aux_graph).backward()
    expect_aux = sum(float(layer.last_aux["switch"]) for _, layer in attached.moe_layers())
    assert float(out.aux_loss) == pytest.approx(expect_aux) and expect_aux > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    for (name, p), (_, pm) in zip(attached.named_parameters(), manual.named_parameters()):
        torch.testing.assert_close(p.grad, pm.grad, msg=name)


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_counts(tie):
    cfg = micro(n_layers=3, moe_layers=[1], tie_embeddings=tie)
    model = standin_model(cfg)
    counts = model.num_parameters()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for p in model.blocks[1].ffn.experts.parameters())
    assert counts["active"] == counts["total"] - routed * (4 - 2) // 4
    V, D = cfg.vocab_size, cfg.d_model
    dense = standin_model(micro(n_layers=3, moe_layers="none", tie_embeddings=tie)).num_parameters()
    assert dense["total"] == dense["active"]
    assert (model.lm_head is None) == tie
    if not tie:
        assert counts["total"] - standin_model(micro(n_layers=3, moe_layers=[1])).num_parameters()["total"] == V * D


def test_tied_logits_use_embedding():
    model = standin_model(micro(moe_layers="none"))
    ids = torch.randint(0, 50, (1, 4))
    h = model.embed(ids)
    for block in model.blocks:
        h = block(h, model.rope_cos, model.rope_sin, None)
    torch.testing.assert_close(model(ids).logits, model.final_norm(h) @ model.embed.weight.T)


def test_init_std():
    cfg = micro(d_model=64, n_heads=4, vocab_size=2000, n_layers=2, moe_layers="none")
    model = standin_model(cfg)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.o_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.1)
    assert torch.all(model.final_norm.weight == 1)


def test_too_long_sequence_rejected():
    model = standin_model(micro())
    with pytest.raises(MoelabError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
