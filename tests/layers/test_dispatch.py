"""Every dispatch backend equals the ``loop`` oracle in output and in every gradient.

ScatterMoE's test pattern (odd sizes, several k) plus MegaBlocks' oracles (capacity-inf equals
dropless); routings are built directly (``from_topk`` / ``from_mask``) so dispatch is tested on
its own, including experts with no tokens, T=1 and variable k.
"""

from __future__ import annotations

import math

import pytest
import torch

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.layers.dispatch import DISPATCHERS, apply_capacity, expert_capacity, pick_dispatcher
from moelab.layers.dispatch._grouped_ffn import TorchGroupedGemm
from moelab.layers.experts import ExpertBank, expert_forward
from moelab.layers.routing import RoutingResult

FAST = ["sorted", "grouped", "capacity"]


def make_bank(D, Fh, E, activation="swiglu", seed=0):
    torch.manual_seed(seed)
    bank = ExpertBank(MoEConfig(d_model=D, d_ff=Fh, num_experts=E, k=1, activation=activation, init_std=0.3))
    return bank


def topk_routing(T, E, K, seed=0, skip_expert=None):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    if skip_expert is not None:
        scores[:, skip_expert] = -1.0  # never chosen: an expert with no tokens
    idx = scores.topk(K, dim=-1).indices
    w = torch.rand(T, K, generator=g).requires_grad_()
    return RoutingResult.from_topk(idx, w, E), w


def ragged_routing(T, E, seed=0):
    """Variable k: each token picks a random subset (some tokens none, some all)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(T, E, generator=g) < 0.4
    mask[0] = False
    if T > 1:
        mask[1] = True
    w = torch.rand(T, E, generator=g)
    r = RoutingResult.from_mask(mask, w)
    r.weight_S = r.weight_S.detach().requires_grad_()  # the leaf whose gradient is checked
    return r, r.weight_S


def run(name, x, routing, w_leaf, bank):
    x = x.detach().clone().requires_grad_()
    for p in bank.parameters():
        p.grad = None
    w_leaf.grad = None
    y = DISPATCHERS.get(name)(x, routing, bank)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    y.backward(gy)
    grads = {"y": y.detach(), "dx": x.grad, "dweights": w_leaf.grad.clone()}
    for n, p in bank.named_parameters():
        grads[n] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
    return grads


def assert_same(a, b, name):
    for key in b:
        ref = b[key]
        scale = ref.abs().max().clamp_min(1e-6)
        err = (a[key] - ref).abs().max() / scale
        assert err < 2e-5, f"{name}: {key} differs from loop by {err:.2e} (relative to max)"


SHAPES = [  # (T, D, F, E, K, activation)
    (37, 100, 600, 6, 2, "swiglu"),
    (29, 100, 600, 8, 3, "swiglu"),
    (16, 32, 24, 8, 8, "swiglu"),
    (21, 24, 40, 4, 1, "swiglu"),
    (1, 32, 48, 4, 2, "swiglu"),
    (19, 101, 37, 5, 2, "swiglu"),  # strides not 16-byte aligned: grouped falls back to mm
    (23, 40, 56, 6, 3, "gelu"),
]


@pytest.mark.parametrize("T,D,Fh,E,K,act", SHAPES)
@pytest.mark.parametrize("name", FAST)
def test_backend_matches_loop_topk(name, T, D, Fh, E, K, act):
    bank = make_bank(D, Fh, E, act)
    routing, w = topk_routing(T, E, K, skip_expert=E - 1 if K < E else None)
    x = torch.randn(T, D)
    assert_same(run(name, x, routing, w, bank), run("loop", x, routing, w, bank), name)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("T,D,Fh,E", [(31, 48, 64, 7), (2, 100, 600, 4)])
def test_backend_matches_loop_variable_k(name, T, D, Fh, E):
    bank = make_bank(D, Fh, E)
    routing, w = ragged_routing(T, E)
    assert routing.k is None
    x = torch.randn(T, D)
    assert_same(run(name, x, routing, w, bank), run("loop", x, routing, w, bank), name)


@pytest.mark.parametrize("name", ["loop", *FAST])
def test_loop_is_the_per_token_formula(name):
    """The oracle itself: y_t = sum over t's slots of w * expert_e(x_t), one token at a time."""
    bank = make_bank(24, 40, 5)
    routing, _ = ragged_routing(9, 5, seed=3)
    x = torch.randn(9, 24)
    with torch.no_grad():
        y = DISPATCHERS.get(name)(x, routing, bank)
        ref = torch.zeros_like(x)
        for t, e, w in zip(routing.token_S.tolist(), routing.expert_S.tolist(), routing.weight_S.tolist()):
            ref[t] += w * expert_forward(bank, x[t : t + 1], e)[0]
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_grouped_mm_path_is_used_on_aligned_fp32():
    assert TorchGroupedGemm.supports(torch.zeros(2, 100), 600)
    assert not TorchGroupedGemm.supports(torch.zeros(2, 101), 600)
    assert not TorchGroupedGemm.supports(torch.zeros(2, 100, dtype=torch.float64), 600)


@pytest.mark.parametrize("name", FAST)
def test_dropped_slots_contribute_nothing(name):
    bank = make_bank(32, 48, 4)
    routing, w = topk_routing(12, 4, 2)
    keep = torch.rand(routing.num_slots, generator=torch.Generator().manual_seed(1)) < 0.5
    x = torch.randn(12, 32)
    y = DISPATCHERS.get(name)(x, routing.with_keep(keep), bank)
    kept = routing.with_keep(keep).kept()
    y_ref = DISPATCHERS.get("loop")(x, kept, bank)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)


def test_capacity_inf_equals_dropless():
    bank = make_bank(32, 48, 6)
    routing, w = topk_routing(40, 6, 3)
    x = torch.randn(40, 32)
    capped = apply_capacity(routing, math.inf, "probs")
    assert bool(capped.keep_S.all()) and capped.dropped_fraction() == 0.0
    big = apply_capacity(routing, 1e6, "position")
    assert bool(big.keep_S.all())
    a = run("capacity", x, capped, w, bank)
    assert_same(a, run("grouped", x, routing, w, bank), "capacity-inf")


def _oracle_keep(routing, C, policy):
    """Per expert, rank its slots by policy with plain Python and keep the first C."""
    keep = [False] * routing.num_slots
    for e in range(routing.num_experts):
        slots = [s for s in range(routing.num_slots) if int(routing.expert_S[s]) == e]
        if policy == "probs":
            slots.sort(key=lambda s: (-float(routing.weight_S[s]), s))
        for s in slots[:C]:
            keep[s] = True
    return torch.tensor(keep)


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("cf", [0.5, 1.0, 1.3])
def test_capacity_keeps_the_right_slots(policy, cf):
    routing, _ = topk_routing(30, 4, 2, seed=5)
    # skew the load so that some experts overflow
    routing.expert_S[: routing.num_slots // 2 : 2] = 0
    routing = RoutingResult.from_topk(
        torch.stack([routing.expert_S.view(30, 2)[:, 0], (routing.expert_S.view(30, 2)[:, 0] + 1) % 4], 1),
        routing.weight_S.detach().view(30, 2), 4,
    )
    C = expert_capacity(cf, routing.num_slots, 4)
    assert C == math.ceil(cf * 60 / 4)
    capped = apply_capacity(routing, cf, policy)
    assert torch.equal(capped.keep_S, _oracle_keep(routing, C, policy))
    assert int(capped.counts_E().max()) <= C
    n_drop = int((~capped.keep_S).sum())
    assert capped.dropped_fraction() == pytest.approx(n_drop / 60)
    if cf < 1:
        assert n_drop > 0


def test_capacity_padding_never_displaces_real_tokens():
    idx = torch.zeros(6, 1, dtype=torch.long)
    w = torch.tensor([[0.9], [0.1], [0.8], [0.2], [0.7], [0.3]])
    valid = torch.tensor([False, True, False, True, True, True])
    r = RoutingResult.from_topk(idx, w, 2, valid_T=valid)
    capped = apply_capacity(r, 1.0, "probs")  # C = ceil(6/2) = 3
    assert capped.keep_S.tolist() == [False, False, False, True, True, True]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_bad_capacity_factor_raises(bad):
    routing, _ = topk_routing(4, 2, 1)
    with pytest.raises(MoelabError, match="capacity_factor"):
        apply_capacity(routing, bad, "probs")


def test_bad_policy_and_backend_raise():
    routing, _ = topk_routing(4, 2, 1)
    with pytest.raises(MoelabError, match="drop_policy.*probs"):
        apply_capacity(routing, 1.0, "random")
    with pytest.raises(MoelabError, match="grouped"):
        pick_dispatcher("fastest", "cpu")


def test_auto_picks_a_registered_backend():
    for dev in ("cpu", "cuda"):
        assert pick_dispatcher("auto", dev) in [DISPATCHERS.get(n) for n in DISPATCHERS.names()]
    assert pick_dispatcher("auto", "cpu") is DISPATCHERS.get("grouped")


@pytest.mark.parametrize("name", FAST)
def test_bf16_close_to_fp32(name):
    bank = make_bank(32, 64, 4)
    routing, w = topk_routing(16, 4, 2)
    x = torch.randn(16, 32)
    y32 = DISPATCHERS.get("loop")(x, routing, bank)
    bank16 = bank.to(torch.bfloat16)
    y16 = DISPATCHERS.get(name)(x.bfloat16(), routing, bank16)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32.detach(), rtol=0.05, atol=0.05 * float(y32.detach().abs().max()))
