"""Balance losses (1.0 at perfect balance), their scopes, z-loss, converters and aux-free bias."""

import math

import pytest
import torch

from moelab.errors import MoelabError
from moelab.layers.balancing import (
    AuxFreeBias,
    GlobalLoadAccumulator,
    balance_losses,
    global_aux_value,
    hf_to_moelab_coef,
    install_aux_free_hook,
    megatron_to_moelab_coef,
    moelab_to_hf_coef,
    sequence_aux_loss,
    switch_aux_loss,
    z_loss,
)
from moelab.layers.config import MoEConfig
from moelab.layers.routers import build_router
from moelab.layers.routing import RoutingContext, RoutingResult

D = 8


def _balanced(E=4, k=2, reps=3):
    """Rows are rotations of one distribution: mean prob uniform and top-k counts equal."""
    v = torch.softmax(torch.tensor([2.0, 1.0, 0.5, -1.0, 0.3, -0.2][:E]), 0)
    probs = torch.stack([v.roll(t) for t in range(E)] * reps)
    idx = probs.topk(k, -1).indices
    return probs, RoutingResult.from_topk(idx, probs.gather(1, idx), E, probs_TE=probs, logits_TE=probs.log())


def _hf_aux(probs_TE, idx_TK, E):
    """Hugging Face's load_balancing_loss_func (Mixtral) for one layer: equals k at balance."""
    mask = torch.nn.functional.one_hot(idx_TK, E).float()  # [T, K, E]
    tokens_per_expert = mask.mean(0)  # [K, E]
    return E * (tokens_per_expert * probs_TE.mean(0)[None]).sum()


# ------------------------------------------------------------------------------------ switch
@pytest.mark.parametrize("E,k", [(4, 1), (4, 2), (6, 3)])
def test_switch_loss_is_one_at_perfect_balance(E, k):
    probs, r = _balanced(E, k)
    assert r.routed_counts_E().unique().numel() == 1
    torch.testing.assert_close(switch_aux_loss(probs, r.routed_counts_E()), torch.tensor(1.0))


def test_switch_loss_hand_computation():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
    counts = torch.tensor([2, 1, 0])  # k=1, T=3
    P = [(0.7 + 0.1 + 0.5) / 3, (0.2 + 0.6 + 0.25) / 3, (0.1 + 0.3 + 0.25) / 3]
    ref = 3 / (1 * 3) * (2 * P[0] + 1 * P[1] + 0 * P[2])
    assert float(switch_aux_loss(probs, counts)) == pytest.approx(ref, rel=1e-6)


def test_switch_loss_relates_to_hf_by_k_and_converters():
    torch.manual_seed(0)
    E, k = 6, 3
    probs = torch.softmax(torch.randn(20, E), -1)
    idx = probs.topk(k, -1).indices
    ours = switch_aux_loss(probs, torch.bincount(idx.reshape(-1), minlength=E))
    torch.testing.assert_close(_hf_aux(probs, idx, E), k * ours)
    # an HF coefficient c contributes c * L_hf = c * k * L_ours
    assert hf_to_moelab_coef(0.01, 8) == pytest.approx(0.08)
    assert moelab_to_hf_coef(hf_to_moelab_coef(0.02, 4), 4) == pytest.approx(0.02)
    assert megatron_to_moelab_coef(0.01) == 0.01


def test_switch_loss_gradient_matches_analytic():
    torch.manual_seed(1)
    T, E = 10, 4
    logits = torch.randn(T, E, requires_grad=True)
    p = torch.softmax(logits, -1)
    counts = torch.tensor([7, 5, 6, 2])
    switch_aux_loss(p, counts).backward()
    f = counts.float() / counts.sum()
    g_p = (E * f / T).expand(T, E)  # dL/dp_ti
    pd = p.detach()
    ref = pd * (g_p - (pd * g_p).sum(-1, keepdim=True))  # through the softmax
    torch.testing.assert_close(logits.grad, ref)


def test_switch_loss_ignores_padding():
    probs, r = _balanced(4, 2)
    T = probs.shape[0]
    junk = torch.tensor([[1.0, 0, 0, 0]] * 5)
    probs2 = torch.cat([probs, junk])
    idx2 = torch.cat([r.topk_view()[0], torch.tensor([[0, 1]] * 5)])
    valid = torch.cat([torch.ones(T, dtype=torch.bool), torch.zeros(5, dtype=torch.bool)])
    r2 = RoutingResult.from_topk(idx2, probs2.gather(1, idx2), 4, probs_TE=probs2, valid_T=valid)
    cfg = MoEConfig(num_experts=4, k=2, aux_loss="switch", aux_loss_coef=1.0)
    torch.testing.assert_close(balance_losses(r2, cfg)["aux_loss"], torch.tensor(1.0))


def test_sigmoid_scores_are_normalised_per_token():
    s = torch.tensor([[0.9, 0.9], [0.2, 0.2]])  # unnormalised sigmoid scores, P = (0.5, 0.5)
    assert float(switch_aux_loss(s, torch.tensor([1, 1]))) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------ sequence
def _seq_routing(B, L, E, k, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(B * L, E, generator=g), -1).requires_grad_(True)
    idx = probs.detach().topk(k, -1).indices
    return probs, RoutingResult.from_topk(idx, probs.gather(1, idx), E, probs_TE=probs)


def test_sequence_loss_is_mean_of_per_sequence_switch_losses():
    B, L, E, k = 3, 5, 4, 2
    probs, r = _seq_routing(B, L, E, k, 0)
    cfg = MoEConfig(num_experts=E, k=k, aux_loss="sequence", aux_loss_coef=1.0)
    got = balance_losses(r, cfg, RoutingContext(batch_shape=(B, L)))["aux_loss"]
    idx = r.topk_view()[0]
    ref = sum(
        switch_aux_loss(probs[b * L:(b + 1) * L], torch.bincount(idx[b * L:(b + 1) * L].reshape(-1), minlength=E))
        for b in range(B)
    ) / B
    torch.testing.assert_close(got, ref)


def test_sequence_loss_one_at_balance_and_stricter_than_switch():
    probs, r = _balanced(4, 1, reps=2)  # 8 tokens
    cfg = MoEConfig(num_experts=4, k=1, aux_loss="sequence", aux_loss_coef=1.0)
    out = balance_losses(r, cfg, RoutingContext(batch_shape=(2, 4)))
    torch.testing.assert_close(out["aux_loss"], torch.tensor(1.0))
    # each sequence sends everything to one expert: balanced over the batch, not per sequence
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 4 + [[0.1, 0.7, 0.1, 0.1]] * 4)
    idx = p.topk(1, -1).indices
    r2 = RoutingResult.from_topk(idx, p.gather(1, idx), 4, probs_TE=p)
    seq = balance_losses(r2, cfg, RoutingContext(batch_shape=(2, 4)))["aux_loss"]
    sw = switch_aux_loss(p, r2.routed_counts_E())
    assert float(seq) == pytest.approx(4 * 0.7) and float(sw) < float(seq)


def test_sequence_loss_invariant_to_micro_batch_split():
    B, L, E, k = 4, 6, 5, 2
    probs, r = _seq_routing(B, L, E, k, 1)
    idx = r.topk_view()[0]
    counts_BE = torch.stack([torch.bincount(idx[b * L:(b + 1) * L].reshape(-1), minlength=E) for b in range(B)])
    full = sequence_aux_loss(probs.view(B, L, E), counts_BE)
    for mb in (1, 2):
        parts = [sequence_aux_loss(probs.view(B, L, E)[i:i + mb], counts_BE[i:i + mb]) for i in range(0, B, mb)]
        torch.testing.assert_close(torch.stack(parts).mean(), full)


def test_sequence_loss_excludes_padding_and_needs_batch_shape():
    B, L, E = 2, 4, 4
    probs, r = _seq_routing(B, L, E, 2, 2)
    valid = torch.tensor([True, True, True, False, True, True, False, False])
    r.valid_T = valid
    cfg = MoEConfig(num_experts=E, k=2, aux_loss="sequence", aux_loss_coef=1.0)
    got = balance_losses(r, cfg, RoutingContext(valid_T=valid, batch_shape=(B, L)))["aux_loss"]
    idx = r.topk_view()[0]
    parts = []
    for b, n in ((0, 3), (1, 2)):
        sl = slice(b * L, b * L + n)
        parts.append(switch_aux_loss(probs[sl], torch.bincount(idx[sl].reshape(-1), minlength=E)))
    torch.testing.assert_close(got, (parts[0] + parts[1]) / 2)
    with pytest.raises(MoelabError, match="batch_shape"):
        balance_losses(r, cfg, RoutingContext())


# ------------------------------------------------------------------------------------ global
def _global_setup(seed=0):
    torch.manual_seed(seed)
    cfg = MoEConfig(d_model=D, num_experts=6, k=2, aux_loss="global", aux_loss_coef=1.0)
    router = build_router(cfg)
    opt = torch.optim.SGD(router.parameters(), lr=0.0)
    install_aux_free_hook(opt, router)
    return cfg, router, opt


def test_global_value_invariant_to_micro_batch_split():
    cfg, router, opt = _global_setup()
    x = torch.randn(24, D)
    values = []
    for mb in (24, 12, 6, 3):
        for i in range(0, 24, mb):
            r = router(x[i:i + mb])
            sum(router.balance_losses(r).values()).backward()
        values.append(float(router.global_load.value()))
        opt.step()  # the hook resets the accumulator
        assert float(router.global_load.tokens) == 0.0
    r_full = router(x)
    ref = switch_aux_loss(r_full.probs_TE.detach(), r_full.routed_counts_E())
    assert values == pytest.approx([float(ref)] * 4, rel=1e-6)
    assert max(values) - min(values) < 1e-12


def test_global_value_is_one_at_balance_and_matches_sums():
    probs, r = _balanced(4, 2)
    acc = GlobalLoadAccumulator(4)
    acc.observe(r)
    torch.testing.assert_close(acc.value().float(), torch.tensor(1.0))
    assert float(global_aux_value(torch.tensor([3.0, 1.0]), torch.tensor([2.5, 1.5]), 4)) == pytest.approx(
        2 * (0.75 * 2.5 / 4 + 0.25 * 1.5 / 4)
    )


def test_global_micro_batch_loss_uses_accumulated_counts_and_its_gradient():
    cfg, router, opt = _global_setup(1)
    x = torch.randn(16, D)
    r1 = router(x[:8])
    router.balance_losses(r1)
    r2 = router(x[8:])
    r2.probs_TE.retain_grad()
    loss = router.balance_losses(r2)["aux_loss"]
    counts = (r1.routed_counts_E() + r2.routed_counts_E()).float()
    f = counts / counts.sum()
    p2 = r2.probs_TE.detach()
    torch.testing.assert_close(loss, 6 * (f * p2.mean(0)).sum())
    loss.backward()
    # dL/dp_tj = E f_j / N_mb - sum_i E f_i p_ti / N_mb (the second term: per-token renormalisation)
    g = r2.probs_TE.grad
    g_ref = 6 * f / 8
    torch.testing.assert_close(g, g_ref.expand(8, 6) - (p2 * g_ref).sum(-1, keepdim=True))


def test_global_loss_outside_training_is_the_switch_loss():
    cfg, router, opt = _global_setup(2)
    router.eval()
    r = router(torch.randn(10, D))
    assert float(router.global_load.tokens) == 0.0
    got = router.balance_losses(r)["aux_loss"]
    torch.testing.assert_close(got, switch_aux_loss(r.probs_TE, r.routed_counts_E()))
    with pytest.raises(MoelabError, match="accumulator"):
        balance_losses(r, cfg)


def test_global_accumulator_excludes_padding():
    cfg, router, opt = _global_setup(3)
    valid = torch.tensor([True] * 5 + [False] * 3)
    r = router(torch.randn(8, D), RoutingContext(valid_T=valid))
    assert float(router.global_load.tokens) == 5.0
    assert float(router.global_load.count_E.sum()) == 5 * 2


# ------------------------------------------------------------------------------------ z-loss
def test_z_loss_hand_computation_padding_and_gradient():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [50.0, 0.0, 0.0]], requires_grad=True)
    valid = torch.tensor([True, True, False])
    lse = [math.log(math.exp(1) + math.exp(2) + math.exp(3)), math.log(3.0)]
    z = z_loss(logits, valid)
    assert float(z.detach()) == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2, rel=1e-6)
    z.backward()
    lse_t = torch.tensor(lse + [0.0])
    ref = 2 * lse_t[:, None] * torch.softmax(logits.detach(), -1) / 2 * valid[:, None]
    torch.testing.assert_close(logits.grad, ref)


# ------------------------------------------------------------------------------------ balance_losses
def test_balance_losses_keys_and_coefficients():
    probs, r = _balanced(4, 2)
    out = balance_losses(r, MoEConfig(num_experts=4, k=2, aux_loss="switch", aux_loss_coef=0.3, z_loss_coef=0.1))
    assert set(out) == {"aux_loss", "z_loss"}
    torch.testing.assert_close(out["aux_loss"], torch.tensor(0.3))
    torch.testing.assert_close(out["z_loss"], 0.1 * z_loss(r.logits_TE))
    assert balance_losses(r, MoEConfig(num_experts=4, k=2, aux_loss="none")) == {}
    with pytest.raises(MoelabError, match="aux_loss='bogus'.*'switch'"):
        balance_losses(r, MoEConfig(num_experts=4, k=2, aux_loss="bogus"))


# ------------------------------------------------------------------------------------ aux-free bias
def _skewed_router(rate=0.02, seed=0):
    torch.manual_seed(seed)
    cfg = MoEConfig(d_model=D, num_experts=4, k=1, router="sigmoid_topk", aux_free_bias=True,
                    bias_update_rate=rate, aux_loss="none")
    router = build_router(cfg)
    with torch.no_grad():
        router.gate.weight_ED.normal_(0, 0.3)
        router.gate.weight_ED[:, 0] = torch.tensor([3.0, 1.0, 0.0, 0.0])  # x[:, 0] > 0.5: expert 0 wins
    return router


def _x_skewed(T, seed):
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(seed))
    x[:, 0] = x[:, 0].abs() + 0.5
    return x


def _max_over_mean(counts):
    c = counts.float()
    return float(c.max() / c.mean())


def test_aux_free_bias_balances_a_skewed_load_with_an_optimizer():
    router = _skewed_router(rate=0.01)
    opt = torch.optim.SGD(router.parameters(), lr=0.0)  # only the bias may change the routing
    install_aux_free_hook(opt, router)
    start = _max_over_mean(router(_x_skewed(256, 0)).counts_E())
    opt.zero_grad()
    for step in range(60):
        r = router(_x_skewed(64, step))
        (r.weight_S.sum() * 0).backward()
        opt.step()
        opt.zero_grad()
    router.eval()
    end = _max_over_mean(router(_x_skewed(256, 999)).counts_E())
    assert start > 3.0 and end < 1.5
    assert router.aux_free.num_updates == 60
    assert abs(float(router.aux_free.bias_E.mean())) < 1e-6  # re-centred


def test_aux_free_bias_updates_once_per_optimizer_step_with_grad_accumulation():
    router = _skewed_router(rate=0.01)
    opt = torch.optim.SGD(router.parameters(), lr=0.0)
    install_aux_free_hook(opt, router)
    total = torch.zeros(4)
    for mb in range(4):
        r = router(_x_skewed(16, mb))
        total += r.routed_counts_E().float()
        (r.weight_S.sum() * 0).backward()
        assert torch.count_nonzero(router.aux_free.bias_E) == 0  # no update during accumulation
    torch.testing.assert_close(router.aux_free.load_E, total)
    opt.step()
    delta = 0.01 * torch.sign(total.mean() - total)
    torch.testing.assert_close(router.aux_free.bias_E, delta - delta.mean())
    assert router.aux_free.num_updates == 1 and float(router.aux_free.load_E.sum()) == 0.0


def test_aux_free_bias_counts_neither_padding_nor_eval_nor_no_grad():
    router = _skewed_router()
    valid = torch.tensor([True] * 10 + [False] * 6)
    r = router(_x_skewed(16, 0), RoutingContext(valid_T=valid))
    torch.testing.assert_close(router.aux_free.load_E, torch.bincount(r.expert_S[:10], minlength=4).float())
    before = router.aux_free.load_E.clone()
    with torch.no_grad():
        router(_x_skewed(16, 1))
    router.eval()
    router(_x_skewed(16, 2))
    torch.testing.assert_close(router.aux_free.load_E, before)


def test_aux_free_bias_state_survives_bf16_cast_and_checkpoints():
    router = _skewed_router()
    router.aux_free.bias_E.fill_(1e-3)
    router.to(torch.bfloat16)
    assert router.aux_free.bias_E.dtype == torch.float32 and float(router.aux_free.bias_E[0]) == pytest.approx(1e-3)
    sd = router.state_dict()
    assert "aux_free.bias_E" in sd and "aux_free.load_E" not in sd
    with pytest.raises(MoelabError, match="bias_update_rate"):
        AuxFreeBias(4, rate=-1.0)


def test_losses_are_zero_without_real_tokens():
    probs, r = _balanced(4, 2)
    none = torch.zeros(probs.shape[0], dtype=torch.bool)
    assert float(switch_aux_loss(probs, torch.zeros(4), none)) == 0.0
    assert float(sequence_aux_loss(probs.view(3, 4, 4), torch.zeros(3, 4), none.view(3, 4))) == 0.0
    assert float(z_loss(r.logits_TE, none)) == 0.0
