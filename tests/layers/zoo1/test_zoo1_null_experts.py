"""null_experts router (AdaMoE): per-token oracle, fewer real experts, AdaMoE balance loss."""

import pytest
import torch

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.layers.routers import build_router
from moelab.layers.routing import RoutingContext


def cfg(**kw):
    base = dict(d_model=10, d_ff=16, num_experts=6, k=2, router="null_experts")
    base.update(kw)
    return MoEConfig(**base)


def loop_oracle(probs_TN, E, k_total):
    """Per token: top-k' over E+m, keep real experts, renormalise their probabilities."""
    dense = torch.zeros(probs_TN.shape[0], E, dtype=probs_TN.dtype)
    for t in range(probs_TN.shape[0]):
        top = torch.topk(probs_TN[t], k_total).indices.tolist()
        real = [e for e in top if e < E]
        s = sum(probs_TN[t, e] for e in real)
        for e in real:
            dense[t, e] = probs_TN[t, e] / s
    return dense


def test_defaults_are_E_null_experts_and_twice_k():
    r = build_router(cfg())
    assert r.num_null == 6 and r.k_total == 4 and r.gate.weight_ED.shape == (12, 10)


def test_matches_loop_oracle_including_gradients():
    torch.manual_seed(0)
    r = build_router(cfg(router_kwargs={"num_null": 3, "k": 3}))
    x = torch.randn(20, 10)
    res = r(x).validate()
    C = torch.randn(20, 6)
    (res.dense_TE() * C).sum().backward()
    W = r.gate.weight_ED.detach().clone().requires_grad_(True)
    dense = loop_oracle((x @ W.t()).softmax(-1), 6, 3)
    assert torch.allclose(res.dense_TE().detach(), dense.detach(), atol=1e-6)
    (dense * C).sum().backward()
    assert torch.allclose(r.gate.weight_ED.grad, W.grad, atol=1e-6)


def test_null_experts_reduce_real_expert_compute():
    r = build_router(cfg(router_kwargs={"num_null": 2, "k": 2}))
    with torch.no_grad():
        r.gate.weight_ED.zero_()
        r.gate.weight_ED[6, 0] = 5.0  # feature 0 -> null expert 6
        r.gate.weight_ED[7, 1] = 5.0  # feature 1 -> null expert 7
        r.gate.weight_ED[2, 2] = 5.0  # feature 2 -> real expert 2
    x = torch.zeros(3, 10)
    x[0, 0] = x[0, 1] = 1.0  # both choices are null: no real expert at all
    x[1, 0] = x[1, 2] = 1.0  # one null, one real
    x[2, 2] = 1.0             # expert 2 first, then a tie among the rest
    res = r(x).validate()
    n = res.experts_per_token_T().tolist()
    assert n[0] == 0 and n[1] == 1
    assert res.num_slots < 3 * r.k_total
    # a token with one real expert gives it the whole weight (renormalised among real experts)
    assert torch.allclose(res.dense_TE()[1], torch.eye(6)[2])


def balance_oracle(probs_TN, chosen_TN, valid):
    N = probs_TN.shape[1]
    f = chosen_TN[valid].float().sum(0) / chosen_TN[valid].sum()
    P = probs_TN[valid].mean(0)
    return N * (f * P).sum()


def test_balance_loss_counts_null_experts_and_ignores_padding():
    torch.manual_seed(1)
    r = build_router(cfg(aux_loss_coef=0.3))
    x = torch.randn(16, 10)
    valid = torch.rand(16) > 0.3
    res = r(x, RoutingContext(valid_T=valid))
    probs = (x @ r.gate.weight_ED.detach().t()).softmax(-1)
    chosen = torch.zeros_like(probs, dtype=torch.bool).scatter(1, probs.topk(4, dim=-1).indices, True)
    want = 0.3 * balance_oracle(probs, chosen, valid)
    assert torch.allclose(res.aux_losses["aux_loss"], want, atol=1e-6)
    r0 = build_router(cfg(router_kwargs={"balance_coef": 0.0}))
    assert "aux_loss" not in r0(x).aux_losses


def test_balance_loss_of_the_router_at_uniform_probabilities_is_one_and_collapse_scores_more():
    """The library's loss (not the oracle): uniform probabilities give N * sum_i f_i / N = 1 by hand,
    whatever the choice; all tokens on the same 4 of 12 experts with their mass there give more."""
    r = build_router(cfg(aux_loss_coef=0.5))
    with torch.no_grad():
        r.gate.weight_ED.zero_()
    x = torch.randn(9, 10)
    assert r(x).aux_losses["aux_loss"].item() == pytest.approx(0.5 * 1.0, rel=1e-6)
    with torch.no_grad():
        r.gate.weight_ED[:4, 0] = 50.0  # experts 0..3 take every token, with probability ~1/4 each
    x = torch.zeros(9, 10)
    x[:, 0] = 1.0
    # f = 1/4 on experts 0..3, P ~ 1/4 there: 12 * 4 * (1/4 * 1/4) = 3
    assert r(x).aux_losses["aux_loss"].item() == pytest.approx(0.5 * 3.0, rel=1e-4)


def test_top_p_selection_variant_matches_a_per_token_loop():
    """Oracle: sort the E+m probabilities, keep experts until the mass before reaches p (at most
    k'), drop the null ones, renormalise the real ones."""
    torch.manual_seed(2)
    r = build_router(cfg(router_kwargs={"selection": "top_p", "p": 0.5, "k": 5}))
    x = torch.randn(30, 10)
    res = r(x).validate()
    probs = (x @ r.gate.weight_ED.detach().t()).softmax(-1)
    dense = torch.zeros(30, 6)
    for t in range(30):
        kept, mass = [], 0.0
        for e in probs[t].argsort(descending=True).tolist():
            if mass >= 0.5 or len(kept) == 5:
                break
            kept.append(e)
            mass += float(probs[t, e])
        real = [e for e in kept if e < 6]
        for e in real:
            dense[t, e] = probs[t, e] / sum(probs[t, j] for j in real)
    assert res.k is None
    torch.testing.assert_close(res.dense_TE().detach(), dense, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kw", [{"num_null": 0}, {"k": 13}, {"selection": "x"}, {"balance_coef": -1.0}])
def test_bad_kwargs_raise(kw):
    with pytest.raises(MoelabError):
        build_router(cfg(router_kwargs=kw))


def test_router_balance_replaces_the_layer_balance_loss():
    torch.manual_seed(3)
    x = torch.randn(8, 10)
    r = build_router(cfg(aux_loss="switch", aux_loss_coef=0.1, z_loss_coef=0.01))
    res = r(x)
    assert r.balance_losses(res) == {}  # no real-experts-only losses on top
    assert set(res.aux_losses) == {"aux_loss", "z_loss"}
    full_logits = x @ r.gate.weight_ED.detach().t()  # z-loss over all E + m logits
    assert torch.allclose(res.aux_losses["z_loss"], 0.01 * (full_logits.logsumexp(-1) ** 2).mean(), atol=1e-6)
    r_none = build_router(cfg(aux_loss="none"))
    assert "aux_loss" not in r_none(x).aux_losses  # aux_loss="none" -> coefficient 0
