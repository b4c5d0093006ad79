"""LoRA adapters: zero-initialised B leaves the base unchanged, the frozen base gets no gradient, each
adapter's output and gradients match an independent dense computation, saving/loading apart from the
base, merging, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from moelab.errors import MoelabError
from moelab.models.config import ModelConfig
from moelab.models.transformer import MoETransformer
from moelab.ops.lora import ADAPTERS, AdapterConfig, add_adapters, load_adapters, merge_lora, save_adapters
from moelab.ops.lora.apply import adapter_state_dict
from moelab.ops.lora.base import AdaptedFFN
from moelab.ops.lora.dynmole import max_tsallis_entropy, tsallis_entropy
from moelab.ops.lora.mixlora import MixLoRAFFN
from moelab.ops.lora.mola import experts_for_block


def base_model(n_layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=n_layers, n_heads=2, d_ff_dense=48, moe_layers="none")
    return MoETransformer(cfg)


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))


def randomize_b(model, seed=1):
    """Give every zero-initialised B factor random values so the adapters do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ".B_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("adapter", ["lora", "mixlora", "smora", "comol", "dynmole", "mola"])
def test_zero_b_is_identity_and_base_gets_no_gradient(adapter):
    base = base_model()
    ref = base(IDS).logits
    model = add_adapters(copy.deepcopy(base), AdapterConfig(adapter=adapter, rank=4, experts=4, k=2,
                                                            attention=adapter == "lora"))
    out = model(IDS, labels_BL=IDS)
    assert (out.logits - ref).abs().max() <= 1e-6
    out.loss.backward()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(dict(model.named_parameters())[n].grad is None for n in frozen)
    b_grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and ".B_" in n]
    assert b_grads and all(g is not None for g in b_grads) and any(float(g.abs().sum()) > 0 for g in b_grads)


def ffn_oracle(ffn: AdaptedFFN | MixLoRAFFN, x_TD):
    """Each adapter written out as per-token dense math with explicit weight matrices."""
    base = ffn.base
    Wg, Wu = base.w_gate_up.weight.chunk(2, dim=0)
    Wd = base.w_down.weight

    def swiglu(x, dg, du, dd):
        h = F.silu(x @ (Wg + dg).T) * (x @ (Wu + du).T)
        return h @ (Wd + dd).T

    if isinstance(ffn, MixLoRAFFN):
        probs = torch.softmax(x_TD @ ffn.router.weight.T, -1)
        rows = []
        for t in range(x_TD.shape[0]):
            top = probs[t].topk(ffn.k).indices
            y = 0
            for e in top.tolist():
                s = ffn.scale
                d = [s * ffn.B_gate_EFr[e] @ ffn.A_gate_ErD[e], s * ffn.B_up_EFr[e] @ ffn.A_up_ErD[e],
                     s * ffn.B_down_EDr[e] @ ffn.A_down_ErF[e]]
                y = y + probs[t, e] / probs[t, top].sum() * swiglu(x_TD[t:t + 1], *d)
            rows.append(y)
        return torch.cat(rows)
    rows = []
    for t in range(x_TD.shape[0]):
        xt = x_TD[t:t + 1]
        g = xt @ Wg.T
        h_in = {"gate": xt, "up": xt}
        dg = token_delta(ffn.deltas["gate"], h_in["gate"])
        du = token_delta(ffn.deltas["up"], h_in["up"])
        h = F.silu(g + xt @ dg.T) * (xt @ Wu.T + xt @ du.T)
        dd = token_delta(ffn.deltas["down"], h)
        rows.append(h @ (Wd + dd).T)
    return torch.cat(rows)


def token_delta(d, x_1I):
    """The [O, I] weight delta one token sees, from the adapter's parameters (independent of its forward)."""
    name = type(d).__name__
    if name == "LoRADelta":
        return d.scale * d.B_Or @ d.A_rI
    probs = torch.softmax(x_1I @ d.router.weight.T if name != "CoMoLDelta" else (x_1I @ d.A_rI.T) @ d.router.weight.T, -1)[0]
    top = probs.topk(d.k if hasattr(d, "k") else d.cfg.k).indices
    g = torch.zeros_like(probs)
    g[top] = probs[top] / probs[top].sum()
    if name == "SMoRADelta":
        return d.cfg.alpha * d.B_Or @ torch.diag(g) @ d.A_rI
    if name == "CoMoLDelta":
        return d.scale * d.B_Or @ (g[:, None, None] * d.C_Err).sum(0) @ d.A_rI
    return sum(g[e] * d.scale * d.B_EOr[e] @ d.A_ErI[e] for e in range(len(g)))  # MoLA


@pytest.mark.parametrize("adapter", ["lora", "mixlora", "smora", "comol", "mola"])
def test_adapter_matches_dense_oracle_outputs_and_gradients(adapter):
    model = add_adapters(base_model(), AdapterConfig(adapter=adapter, rank=4, experts=4, k=2, aux_loss_coef=0.0))
    randomize_b(model)
    ffn = model.blocks[1].ffn
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(3))
    y = ffn(x)
    y_ref = ffn_oracle(ffn, x)
    assert torch.allclose(y, y_ref, atol=1e-5)
    params = [p for p in ffn.parameters() if p.requires_grad]
    g = torch.autograd.grad(y.pow(2).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad(y_ref.pow(2).sum(), params, allow_unused=True)
    for a, b in zip(g, g_ref):
        if b is not None:
            assert a is not None and torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_dynmole_soft_routes_uncertain_tokens():
    model = add_adapters(base_model(), AdapterConfig(adapter="dynmole", rank=4, experts=4, k=1, entropy_threshold=0.0))
    ffn = model.blocks[0].ffn
    x = torch.randn(5, 32)
    w_TE, aux = ffn.route(x)
    assert (w_TE > 0).all()  # threshold 0: every token is "uncertain" -> soft over all experts
    assert set(aux) == {"aux_loss", "entropy_loss"}
    ffn.cfg.entropy_threshold = 1.0
    w_TE, _ = ffn.route(x)
    assert ((w_TE > 0).sum(1) == 1).all()  # never above the maximum entropy -> top-1
    p = torch.tensor([[0.5, 0.25, 0.25]])
    assert float(tsallis_entropy(p, 2.0)) == pytest.approx(1 - (0.25 + 0.0625 * 2))
    assert max_tsallis_entropy(3, 2.0) == pytest.approx(2 / 3)


def test_mola_gives_higher_layers_more_experts():
    cfg = AdapterConfig(adapter="mola", experts=8, k=2)
    assert [experts_for_block(i, 8, cfg) for i in range(8)] == [2, 2, 4, 4, 6, 6, 8, 8]
    model = add_adapters(base_model(n_layers=4), cfg)
    assert [b.ffn.deltas["up"].A_ErI.shape[0] for b in model.blocks] == [2, 4, 6, 8]


def test_save_load_apart_from_base_and_merge(tmp_path):
    base = base_model()
    cfg = AdapterConfig(adapter="lora", rank=4, attention=True)
    model = add_adapters(copy.deepcopy(base), cfg)
    randomize_b(model)
    want = model(IDS).logits
    save_adapters(model, cfg, tmp_path / "a")
    saved = adapter_state_dict(model)
    assert not any(k.endswith("w_gate_up.weight") or k == "embed.weight" for k in saved)  # adapters only
    again = load_adapters(copy.deepcopy(base), tmp_path / "a")
    assert torch.allclose(again(IDS).logits, want, atol=1e-6)
    merged = merge_lora(again)
    assert not any(isinstance(m, AdaptedFFN) for m in merged.modules())
    assert set(merged.state_dict()) == set(base.state_dict())
    assert torch.allclose(merged(IDS).logits, want, atol=1e-5)


def test_bad_input(tmp_path):
    with pytest.raises(MoelabError, match="rank=64 is larger than the layer's dimension"):
        add_adapters(base_model(), AdapterConfig(adapter="lora", rank=64))
    with pytest.raises(MoelabError, match="k=5"):
        add_adapters(base_model(), AdapterConfig(adapter="mixlora", experts=4, k=5))
    with pytest.raises(MoelabError, match="k=9"):
        add_adapters(base_model(), AdapterConfig(adapter="smora", rank=8, k=9))
    with pytest.raises(MoelabError, match="unknown adapter"):
        add_adapters(base_model(), AdapterConfig(adapter="dora"))
    with pytest.raises(MoelabError, match="targets"):
        add_adapters(base_model(), AdapterConfig(targets=["attn"]))
    m = add_adapters(base_model(), AdapterConfig(adapter="mixlora"))
    with pytest.raises(MoelabError, match="single LoRA"):
        merge_lora(m)
    moe = MoETransformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2))
    with pytest.raises(MoelabError, match="has none"):
        add_adapters(moe, AdapterConfig())
    (tmp_path / "bad").mkdir()
    save_adapters(add_adapters(base_model(), AdapterConfig()), AdapterConfig(), tmp_path / "bad")
    (tmp_path / "bad" / "adapters.safetensors").write_bytes(b"garbage")
    with pytest.raises(MoelabError, match="not a readable safetensors"):
        load_adapters(base_model(), tmp_path / "bad")
    assert "lora" in ADAPTERS


def test_adapters_twice_is_refused():
    m = add_adapters(base_model(), AdapterConfig())
    with pytest.raises(MoelabError, match="already has adapters"):
        add_adapters(m, AdapterConfig(adapter="mixlora"))
