"""Depth routers inside the model (moelab.models.depth): exact identity when everything executes, hand-computed
oracles for skip / repeat / small-FFN paths, per-row decisions, causality, and KV-cached decoding == recompute."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.models.config import ModelConfig
from moelab.models.depth import check_applies, forcing, install_depth, route_prefix
from moelab.models.generation import KVCache
from moelab.models.transformer import MoETransformer

SPECS = {"drllm": {"method": "drllm", "hidden": 16, "windows": 3},
         "router_tuning": {"method": "router_tuning"},
         "router_tuning_token": {"method": "router_tuning", "granularity": "token"},
         "duo": {"method": "duo", "small_ff": 8, "small_cost": 0.1}}
EXECUTE = {"drllm": 1, "router_tuning": 1, "router_tuning_token": 1, "duo": 2}


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=61, d_model=32, n_layers=3, n_heads=2, max_seq_len=32, d_ff_dense=48,
                moe=MoEConfig(d_ff=16, num_experts=4, k=2), moe_layers=[0, 2])
    base.update(kw)
    return ModelConfig(**base).validate()


@pytest.fixture
def base():
    torch.manual_seed(0)
    return MoETransformer(_cfg()).eval()


def routed(base, name, seed=1, scramble=False):
    torch.manual_seed(seed)
    m = MoETransformer(replace(base.cfg, depth=SPECS[name])).eval()
    missing = m.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing and all(".depth." in k for k in missing)
    if scramble:  # random router weights, so that decisions vary by row / token
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if ".depth." in n and "small" not in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 3)
    return m


def ids(B=2, L=12, seed=3):
    return torch.randint(0, 61, (B, L), generator=torch.Generator().manual_seed(seed))


def hand_forward(base, x_ids, layer_fn):
    """Embedding, ``layer_fn(i, block, x)`` per block, final norm, tied head: an independent loop."""
    x = base.embed(x_ids)
    for i, b in enumerate(base.blocks):
        x = layer_fn(i, b, x)
    h = F.rms_norm(x, (x.shape[-1],), base.final_norm.weight, base.cfg.norm_eps)
    return h @ base.embed.weight.T


def ffn_update(b, x):
    h = F.rms_norm(x, (x.shape[-1],), b.ffn_norm.weight, b.ffn_norm.eps)
    y = b.ffn(h.reshape(-1, h.shape[-1])).view_as(h) if b.is_moe else b.ffn(h)
    return y


def attn_update(base, b, x):
    h = F.rms_norm(x, (x.shape[-1],), b.attn_norm.weight, b.attn_norm.eps)
    return b.attn(h, base.rope_cos, base.rope_sin)


@pytest.mark.parametrize("name", list(SPECS))
def test_execute_all_equals_the_unmodified_model_exactly(base, name):
    m, x = routed(base, name), ids()
    labels = ids(seed=4)
    ref = base(x, labels)
    with forcing(m, {i: EXECUTE[name] for i in range(3)}):
        out = m(x, labels)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
    with forcing(m, {i: EXECUTE[name] for i in range(3)}):
        assert torch.equal(m.generate(x[:, :4], 6, temperature=0), base.generate(x[:, :4], 6, temperature=0))


@pytest.mark.parametrize("name", ["drllm", "duo"])
def test_untrained_routers_execute_everything(base, name):
    x = ids()
    assert torch.equal(routed(base, name)(x).logits, base(x).logits)


def test_skip_all_attention_equals_the_model_without_attention(base):
    m, x = routed(base, "router_tuning"), ids()
    with forcing(m, {i: 0 for i in range(3)}):
        got = m(x).logits
    want = hand_forward(base, x, lambda i, b, h: h + ffn_update(b, h))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_token_level_attention_skip_keeps_keys_and_values(base):
    """A token whose attention output is dropped still serves as a key/value for later tokens."""
    m, x = routed(base, "router_tuning_token"), ids(B=1)
    keep = torch.ones(1, 12)
    keep[0, 5] = 0
    with forcing(m, {0: keep, 1: 1, 2: 1}):
        got = m(x).logits

    def layer(i, b, h):
        a = attn_update(base, b, h)
        if i == 0:
            a = a * keep[..., None]
        h = h + a
        return h + ffn_update(b, h)

    torch.testing.assert_close(got, hand_forward(base, x, layer), rtol=1e-5, atol=1e-5)


def test_drllm_skip_and_repeat_per_row_equal_hand_computed_loops(base):
    m, x = routed(base, "drllm"), ids()
    with forcing(m, {0: torch.tensor([0, 2]), 1: 1, 2: torch.tensor([2, 0])}):
        got = m(x).logits

    def block(b, h):
        h = h + attn_update(base, b, h)
        return h + ffn_update(b, h)

    for row, acts in ((0, (0, 1, 2)), (1, (2, 1, 0))):
        def layer(i, b, h, acts=acts):
            for _ in range(acts[i]):
                h = block(b, h)
            return h
        want = hand_forward(base, x[row:row + 1], layer)
        torch.testing.assert_close(got[row:row + 1], want, rtol=1e-5, atol=1e-5)


def test_duo_small_and_skip_paths_equal_hand_computed(base):
    m, x = routed(base, "duo"), ids(B=1)
    small = [b.depth.small for b in m.blocks]
    choice = torch.tensor([[0, 1, 2] * 4])
    with forcing(m, {0: choice, 1: 1, 2: 0}):
        got = m(x).logits

    def layer(i, b, h):
        h = h + attn_update(base, b, h)
        hn = F.rms_norm(h, (h.shape[-1],), b.ffn_norm.weight, b.ffn_norm.eps)
        c = choice if i == 0 else torch.full_like(choice, 1 if i == 1 else 0)
        up = torch.where((c == 2)[..., None], ffn_update(b, h), torch.where((c == 1)[..., None], small[i](hn), 0.0))
        return h + up

    torch.testing.assert_close(got, hand_forward(base, x, layer), rtol=1e-5, atol=1e-5)


def _cached_logits(m, x, P):
    cache = KVCache.for_model(m, x.shape[0], x.shape[1])
    outs = [m(x[:, :P], kv_cache=cache).logits[:, -1]]
    for t in range(P, x.shape[1] - 1):
        outs.append(m(x[:, t:t + 1], kv_cache=cache).logits[:, -1])
    return torch.stack(outs, 1)


@pytest.mark.parametrize("name", list(SPECS))
def test_kv_cached_decoding_equals_full_recomputation(base, name):
    m, x, P = routed(base, name, scramble=True), ids(B=3, L=14), 5
    with route_prefix(m, P):
        full = m(x).logits[:, P - 1:-1]
    decisions = [b.depth.last_action.float() for b in m.blocks]
    assert any(0 < float(d.mean()) < EXECUTE[name] for d in decisions), "decisions should be mixed"
    torch.testing.assert_close(_cached_logits(m, x, P), full, rtol=1e-4, atol=1e-4)
    assert torch.equal(m.generate(x[:, :P], 8, temperature=0), m.generate(x[:, :P], 8, temperature=0, use_cache=False))


@pytest.mark.parametrize("name", list(SPECS))
def test_routed_model_is_causal(base, name):
    m, x, P = routed(base, name, scramble=True), ids(B=2, L=14), 6
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 61
    with route_prefix(m, P):
        a, b = m(x).logits, m(y).logits
    assert torch.equal(a[:, :10], b[:, :10])


def test_repeat_gets_its_own_cache_slot(base):
    assert base.kv_slots() == 3
    assert routed(base, "drllm").kv_slots() == 6 and routed(base, "duo").kv_slots() == 3


def test_methods_that_do_not_apply_are_refused(base):
    with pytest.raises(MoelabError, match="method='bogus'.*drllm"):
        check_applies(base, "bogus")
    with pytest.raises(MoelabError, match="needs a moelab transformer"):
        check_applies(torch.nn.Linear(2, 2), "drllm")
    with pytest.raises(MoelabError, match="already depth-routed"):
        install_depth(routed(base, "drllm"), {"method": "duo", "small_ff": 4, "small_cost": 0.1})
    class InnerResidual(torch.nn.Module):  # a Chain-of-Experts residual="inner" stand-in
        block_residual = False

    base.blocks[0].ffn = InnerResidual()
    for method in ("drllm", "duo"):
        with pytest.raises(MoelabError, match="inner-residual"):
            check_applies(base, method)
    check_applies(base, "router_tuning")
