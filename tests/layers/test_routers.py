"""Router-specific behaviour against hand-written / dense oracles, and config validation."""

import math

import pytest
import torch

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.layers.routers import ROUTERS, build_router
from moelab.layers.routers.expert_choice import expert_capacity
from moelab.layers.routing import RoutingContext

D = 12


def _cfg(router, E=8, k=2, **kw):
    return MoEConfig(d_model=D, num_experts=E, k=k, router=router, router_kwargs=kw.pop("rk", {}), **kw)


def _x(T, seed=0):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ softmax_topk
def _softmax_topk_oracle(x, W, k, renormalize):
    """Per-token loop: softmax over all experts, take the k largest, optionally renormalise."""
    rows_idx, rows_w = [], []
    for t in range(x.shape[0]):
        logits = [float((x[t] * W[e]).sum()) for e in range(W.shape[0])]
        m = max(logits)
        z = sum(math.exp(v - m) for v in logits)
        p = [math.exp(v - m) / z for v in logits]
        order = sorted(range(len(p)), key=lambda e: -p[e])[:k]
        w = [p[e] for e in order]
        if renormalize:
            s = sum(w)
            w = [v / s for v in w]
        rows_idx.append(order)
        rows_w.append(w)
    return torch.tensor(rows_idx), torch.tensor(rows_w)


@pytest.mark.parametrize("k,renorm", [(1, False), (2, True), (2, False), (3, True)])
def test_softmax_topk_matches_loop_oracle(k, renorm):
    torch.manual_seed(0)
    router = build_router(_cfg("softmax_topk", k=k, rk={"renormalize": renorm}))
    x = _x(9)
    idx, w, _ = router(x).topk_view()
    ref_idx, ref_w = _softmax_topk_oracle(x.double(), router.gate.weight_ED.detach().double(), k, renorm)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w.double(), ref_w.double(), atol=1e-6, rtol=1e-5)


def test_softmax_topk_gradient_matches_dense_oracle():
    torch.manual_seed(1)
    router = build_router(_cfg("softmax_topk", k=2))
    x = _x(7)
    r = router(x)
    c = torch.randn(r.num_slots)
    (r.weight_S * c).sum().backward()
    # dense oracle: the same weights written as a [T, E] masked, renormalised softmax
    W = router.gate.weight_ED.detach().clone().requires_grad_(True)
    p = torch.softmax(x @ W.T, -1)
    mask = torch.zeros_like(p, dtype=torch.bool)
    mask[r.token_S, r.expert_S] = True
    dense = (p * mask) / (p * mask).sum(-1, keepdim=True)
    C = torch.zeros_like(p)
    C[r.token_S, r.expert_S] = c
    (dense * C).sum().backward()
    torch.testing.assert_close(router.gate.weight_ED.grad, W.grad, atol=1e-6, rtol=1e-5)


def test_mixtral_order_equals_softmax_then_renormalise():
    torch.manual_seed(2)
    a = build_router(_cfg("softmax_topk", k=2, rk={"score_order": "topk_then_softmax"}))
    b = build_router(_cfg("softmax_topk", k=2, rk={"score_order": "softmax_then_topk", "renormalize": True}))
    b.load_state_dict(a.state_dict())
    ra, rb = a(_x(11)), b(_x(11))
    assert torch.equal(ra.expert_S, rb.expert_S)
    torch.testing.assert_close(ra.weight_S, rb.weight_S)
    torch.testing.assert_close(ra.probs_TE.sum(-1), torch.ones(11))


def test_switch_k1_rejects_constant_weights():
    with pytest.raises(MoelabError, match="k=1"):
        build_router(_cfg("softmax_topk", k=1, rk={"score_order": "topk_then_softmax"}))
    r = build_router(_cfg("softmax_topk", k=1))(_x(5))
    torch.testing.assert_close(r.weight_S, r.probs_TE.max(-1).values)  # Switch: gate value = max prob


def test_softmax_topk_bf16_weights_still_fp32_math():
    torch.manual_seed(0)
    router = build_router(_cfg("softmax_topk")).to(torch.bfloat16)
    x = _x(6).bfloat16()
    r = router(x)
    assert r.logits_TE.dtype == torch.float32 and r.weight_S.dtype == torch.float32
    torch.testing.assert_close(r.logits_TE, x.float() @ router.gate.weight_ED.float().T)


# ------------------------------------------------------------------------------------ sigmoid_topk
def test_sigmoid_topk_weights_are_normalised_scaled_sigmoid():
    torch.manual_seed(3)
    router = build_router(_cfg("sigmoid_topk", k=3, rk={"route_scale": 2.5}))
    x = _x(10)
    idx, w, _ = router(x).topk_view()
    s = torch.sigmoid(x @ router.gate.weight_ED.detach().T)
    ref_idx = s.topk(3, -1).indices
    assert torch.equal(idx, ref_idx)
    sel = s.gather(1, ref_idx)
    torch.testing.assert_close(w, 2.5 * sel / sel.sum(-1, keepdim=True))


def test_sigmoid_group_limited_never_leaves_chosen_groups():
    torch.manual_seed(4)
    E, G, TG = 16, 4, 2
    router = build_router(_cfg("sigmoid_topk", E=E, k=4, rk={"n_groups": G, "topk_groups": TG}))
    x = _x(40)
    r = router(x)
    s = torch.sigmoid(x @ router.gate.weight_ED.detach().T)
    for t in range(40):
        # oracle: group score = sum of the group's two largest scores; keep the best TG groups
        gs = [sorted(s[t, g * 4:(g + 1) * 4].tolist())[-2:] for g in range(G)]
        best = sorted(range(G), key=lambda g: -sum(gs[g]))[:TG]
        allowed = [e for g in best for e in range(g * 4, (g + 1) * 4)]
        chosen = r.expert_S[r.token_S == t].tolist()
        assert set(chosen) <= set(allowed)
        ref = sorted(allowed, key=lambda e: -float(s[t, e]))[:4]
        assert set(chosen) == set(ref)


def test_bias_changes_selection_not_weights():
    torch.manual_seed(5)
    cfg = _cfg("sigmoid_topk", E=6, k=2, aux_free_bias=True)
    router = build_router(cfg).eval()
    x = _x(8)
    before = router(x)
    router.aux_free.bias_E.copy_(torch.tensor([5.0, 0, 0, 0, 0, -5.0]))
    after = router(x)
    assert torch.equal(after.selection_bias_E, router.aux_free.bias_E)
    idx, w, _ = after.topk_view()
    assert bool((idx == 0).any(-1).all()) and not bool((idx == 5).any())  # bias forced the choice
    s = torch.sigmoid(x @ router.gate.weight_ED.detach().T)
    sel = s.gather(1, idx)
    torch.testing.assert_close(w, sel / sel.sum(-1, keepdim=True))  # weights from unbiased scores
    assert not torch.equal(before.expert_S, after.expert_S)


def test_sigmoid_group_config_errors():
    with pytest.raises(MoelabError, match="n_groups"):
        build_router(_cfg("sigmoid_topk", E=8, rk={"n_groups": 3}))
    with pytest.raises(MoelabError, match="topk_groups"):
        build_router(_cfg("sigmoid_topk", E=8, rk={"n_groups": 4, "topk_groups": 5}))
    with pytest.raises(MoelabError, match="k=4"):
        build_router(_cfg("sigmoid_topk", E=8, k=4, rk={"n_groups": 4, "topk_groups": 1}))


# ------------------------------------------------------------------------------------ noisy_topk
def test_noisy_topk_eval_is_clean_keep_topk_softmax():
    torch.manual_seed(6)
    router = build_router(_cfg("noisy_topk", k=2, rk={"zero_init": False})).eval()
    x = _x(9)
    idx, w, _ = router(x).topk_view()
    logits = x @ router.gate.weight_ED.detach().T
    ref_idx = logits.topk(2, -1).indices
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, torch.softmax(logits.gather(1, ref_idx), -1))


def test_noisy_topk_training_noise_has_softplus_std():
    torch.manual_seed(7)
    router = build_router(_cfg("noisy_topk", E=4, k=1))  # zero init as in the paper: W_g = W_noise = 0
    with torch.no_grad():
        router.noise_gate.weight_ED.zero_()
    r = router(_x(4000))
    std = float(r.logits_TE.detach().std())  # H = 0 + N(0,1) * softplus(0)
    assert abs(std - math.log(2.0)) < 0.03
    assert len(set(r.expert_S.tolist())) == 4  # noise spreads tokens over experts


def test_noisy_topk_paper_losses():
    torch.manual_seed(8)
    router = build_router(_cfg("noisy_topk", E=4, k=2,
                               rk={"zero_init": False, "importance_coef": 0.5, "load_coef": 0.25}))
    x = _x(30)
    r = router(x)
    importance = r.dense_TE().sum(0).detach()
    ref = 0.5 * importance.var(unbiased=False) / importance.mean() ** 2
    torch.testing.assert_close(r.aux_losses["importance"].detach(), ref, atol=1e-6, rtol=1e-4)
    load = r.aux_losses["load"]
    # oracle (Shazeer et al. 2017, appendix A), per token and expert: P = Phi((clean - kth_excl) / std)
    H = r.logits_TE.detach()
    clean = x @ router.gate.weight_ED.detach().T
    std = torch.nn.functional.softplus(x @ router.noise_gate.weight_ED.detach().T)
    P = torch.zeros(30, 4)
    for t in range(30):
        for i in range(4):
            others = torch.cat([H[t, :i], H[t, i + 1:]]).sort(descending=True).values
            z = (clean[t, i] - others[1]) / std[t, i]  # the k-th (k=2) largest of H excluding i
            P[t, i] = 0.5 * (1 + math.erf(float(z) / math.sqrt(2.0)))
    load_sum = P.sum(0)
    ref_load = 0.25 * load_sum.var(unbiased=False) / load_sum.mean() ** 2
    torch.testing.assert_close(load.detach(), ref_load, atol=1e-6, rtol=1e-4)
    load.backward()
    assert router.noise_gate.weight_ED.grad.abs().sum() > 0 and router.gate.weight_ED.grad.abs().sum() > 0
    assert "load" not in router.eval()(x).aux_losses  # the load estimator needs the noise


# ------------------------------------------------------------------------------------ expert_choice
def test_expert_choice_each_expert_takes_its_top_c_tokens():
    torch.manual_seed(9)
    E, k, T = 4, 2, 10
    router = build_router(_cfg("expert_choice", E=E, k=k))
    x = _x(T)
    r = router(x)
    r.validate()
    assert r.k is None and r.causal is False and type(router).causal is False
    C = expert_capacity(T, k, E)
    assert C == math.ceil(T * k / E)
    s = torch.softmax(x @ router.gate.weight_ED.detach().T, -1)
    for e in range(E):
        toks = r.token_S[r.expert_S == e]
        assert toks.numel() == C
        assert set(toks.tolist()) == set(s[:, e].topk(C).indices.tolist())
    torch.testing.assert_close(r.weight_S, s[r.token_S, r.expert_S])
    per_tok = r.experts_per_token_T()
    assert int(per_tok.sum()) == C * E  # tokens get 0..E experts


def test_expert_choice_per_sequence_and_padding():
    torch.manual_seed(10)
    E, k, B, L = 4, 1, 2, 8
    router = build_router(_cfg("expert_choice", E=E, k=k))
    x = _x(B * L)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, 4:] = False
    r = router(x, RoutingContext(valid_T=valid.reshape(-1), batch_shape=(B, L)))
    seq = r.token_S // L
    for e in range(E):
        assert int(((r.expert_S == e) & (seq == 0)).sum()) == expert_capacity(8, k, E)
        assert int(((r.expert_S == e) & (seq == 1)).sum()) == expert_capacity(4, k, E)
    assert bool(valid.reshape(-1)[r.token_S].all())  # padding is never chosen
    # per-sequence groups: sequence 0's routing ignores what sequence 1 contains
    x2 = x.clone()
    x2[L:] = torch.randn(L, D)
    r2 = router(x2, RoutingContext(valid_T=valid.reshape(-1), batch_shape=(B, L)))
    m, m2 = r.token_S < L, r2.token_S < L
    assert torch.equal(r.token_S[m], r2.token_S[m2]) and torch.equal(r.expert_S[m], r2.expert_S[m2])


def test_expert_choice_rejects_aux_free_bias():
    with pytest.raises(MoelabError, match="aux_free_bias"):
        build_router(_cfg("expert_choice", aux_free_bias=True))


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("k", [0, -1, 9])
def test_build_router_rejects_bad_k(k):
    with pytest.raises(MoelabError, match=f"k={k}"):
        build_router(_cfg("softmax_topk", E=8, k=k))


def test_build_router_names_choices_for_unknown_router():
    with pytest.raises(MoelabError, match="router='nope'.*softmax_topk"):
        build_router(_cfg("nope"))


def test_build_router_rejects_unknown_router_kwargs_naming_choices():
    with pytest.raises(MoelabError, match="'bogus'.*score_order.*renormalize"):
        build_router(_cfg("softmax_topk", rk={"bogus": 1}))
    with pytest.raises(MoelabError, match="score_order='sideways'.*softmax_then_topk"):
        build_router(_cfg("softmax_topk", rk={"score_order": "sideways"}))


@pytest.mark.parametrize("name", ["softmax_topk", "sigmoid_topk", "noisy_topk", "expert_choice"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_raise(name, bad):
    router = build_router(_cfg(name, rk={"zero_init": False} if name == "noisy_topk" else {}))
    x = _x(4)
    x[2, 3] = bad
    with pytest.raises(MoelabError, match="non-finite"):
        router(x)


@pytest.mark.parametrize("name", ["softmax_topk", "sigmoid_topk", "noisy_topk", "expert_choice"])
def test_bad_input_dtype_and_shape(name):
    router = build_router(_cfg(name))
    with pytest.raises(MoelabError, match="dtype"):
        router(torch.ones(3, D, dtype=torch.long))
    with pytest.raises(MoelabError, match="d_model=12"):
        router(torch.ones(3, D - 1))


def test_registry_has_the_core_routers():
    assert {"softmax_topk", "sigmoid_topk", "noisy_topk", "expert_choice"} <= set(ROUTERS.names())


@pytest.mark.parametrize("name", ["softmax_topk", "sigmoid_topk", "noisy_topk", "expert_choice"])
def test_fp32_logits_under_autocast_and_empty_batch(name):
    torch.manual_seed(11)
    router = build_router(_cfg(name, rk={"zero_init": False} if name == "noisy_topk" else {})).eval()
    x = _x(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(x)
    assert r.logits_TE.dtype == torch.float32
    torch.testing.assert_close(r.logits_TE, x @ router.gate.weight_ED.detach().T)
    empty = router(torch.zeros(0, D)).validate()
    assert empty.num_slots == 0 and empty.num_tokens == 0
