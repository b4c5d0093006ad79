"""Shared expert pools (UniPool), ReXMoE windows, shared routers and the pool-level balance loss."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from moelab.errors import MoelabError
from moelab.layers.balancing import install_aux_free_hook, switch_aux_loss
from moelab.layers.config import MoEConfig
from moelab.layers.experts import ExpertBank
from moelab.layers.layouts import LayoutConfig, layout_param_counts, plan_layout, pool_balance_loss
from moelab.layers.moe import MoELayer
from moelab.layers.pool import (
    PooledExperts, PoolBalance, PoolMoELayer, ReusedDecision, build_layout, exact_pool_loss, routed_param_counts,
)
from moelab.layers.routing import RoutingContext, RoutingResult

D, F = 16, 24


def moe_cfg(**kw) -> MoEConfig:
    base = dict(d_model=D, d_ff=F, num_experts=4, k=2, router="softmax_topk", aux_loss="switch", aux_loss_coef=0.01)
    base.update(kw)
    return MoEConfig(**base)


def run_stack(layers, x_TD, ctx=None):
    """Residual stack of MoE layers sharing one RoutingContext (as the model runs them)."""
    ctx = ctx if ctx is not None else RoutingContext(state={})
    h = x_TD
    for i, layer in enumerate(layers):
        h = h + layer(h, replace(ctx, layer_index=i))
    return h


def build(layout: LayoutConfig, cfg: MoEConfig, n_layers: int):
    owner, layers = build_layout(layout, cfg, list(range(n_layers)))
    return owner, [layers[i] for i in range(n_layers)]


# --------------------------------------------------------------------------- sharing is real
def test_shared_pool_is_one_parameter_and_its_gradient_is_the_sum_over_layers():
    torch.manual_seed(0)
    cfg = moe_cfg(num_experts=4)
    L = 3
    owner, layers = build(LayoutConfig(kind="shared_pool", pool_size=6, pool_loss_coef=0.0), cfg, L)
    bank = owner.banks[0]
    for layer in layers:  # every layer's window is the bank's own parameter, not a copy
        assert layer.experts.w_up_EFD is bank.w_up_EFD and layer.experts.num_experts == 6
    model = nn.ModuleList([owner, *layers])
    assert sum(p is bank.w_gate_EFD for p in model.parameters()) == 1
    assert [k for k in model.state_dict() if k.endswith("w_gate_EFD")] == ["0.banks.0.w_gate_EFD"]

    # Oracle: private copies of the pool (tied by value), one per layer, same routers.
    copies = []
    for layer in layers:
        ref = MoELayer(replace(cfg, num_experts=6))
        ref.router.load_state_dict(layer.router.state_dict())
        ref.experts.load_state_dict(bank.state_dict())
        copies.append(ref)
    x = torch.randn(2 * 11, D)
    y = run_stack(layers, x)
    y_ref = run_stack(copies, x)
    torch.testing.assert_close(y, y_ref)
    y.pow(2).mean().backward()
    y_ref.pow(2).mean().backward()
    for name in ("w_gate_EFD", "w_up_EFD", "w_down_EDF"):
        summed = sum(getattr(c.experts, name).grad for c in copies)
        torch.testing.assert_close(getattr(bank, name).grad, summed)
        assert all(getattr(c.experts, name).grad.abs().sum() > 0 for c in copies)  # every layer contributes
    for layer, ref in zip(layers, copies):
        torch.testing.assert_close(layer.router.gate.weight_ED.grad, ref.router.gate.weight_ED.grad)


@pytest.mark.parametrize("router", ["softmax_topk", "norm"])
def test_rexmoe_radius_zero_reproduces_vanilla_per_layer_moe(router):
    """A bank of L*E experts, layer l restricted to its slice l*E..(l+1)*E, is vanilla MoE."""
    torch.manual_seed(1)
    cfg = moe_cfg(router=router, num_experts=4)
    L, E = 3, 4
    owner, layers = build(LayoutConfig(kind="rexmoe", rexmoe_radius=0, pool_loss_coef=0.0), cfg, L)
    assert owner.plan.banks == (L * E,)
    vanilla = [MoELayer(cfg) for _ in range(L)]
    bank = owner.banks[0]
    with torch.no_grad():
        for l, (layer, ref) in enumerate(zip(layers, vanilla)):
            layer.router.load_state_dict(ref.router.state_dict())
            for name in ("w_gate_EFD", "w_up_EFD", "w_down_EDF"):
                getattr(bank, name)[l * E:(l + 1) * E] = getattr(ref.experts, name)
            assert layer.experts.expert_map.tolist() == list(range(l * E, (l + 1) * E))
    x = torch.randn(20, D)
    y, y_ref = run_stack(layers, x), run_stack(vanilla, x)
    torch.testing.assert_close(y, y_ref)
    (y.pow(2).mean() + y.sum()).backward()
    (y_ref.pow(2).mean() + y_ref.sum()).backward()
    for l, (layer, ref) in enumerate(zip(layers, vanilla)):
        for name in ("w_gate_EFD", "w_up_EFD", "w_down_EDF"):
            torch.testing.assert_close(getattr(bank, name).grad[l * E:(l + 1) * E], getattr(ref.experts, name).grad)
        for (n, p), (_, q) in zip(layer.router.named_parameters(), ref.router.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=n)
        assert layer.last_aux.keys() == ref.last_aux.keys()


def test_rexmoe_windows_cover_adjacent_layers():
    plan = plan_layout(LayoutConfig(kind="rexmoe", rexmoe_radius=1), 4, 2, [0, 1, 2, 3])
    assert [lp.segments for lp in plan.layers] == [((0, 0, 8),), ((0, 0, 12),), ((0, 4, 16),), ((0, 8, 16),)]
    assert [lp.num_experts for lp in plan.layers] == [8, 12, 12, 8]
    assert plan.routed_experts == 16  # no extra parameters


def test_pool_plus_private_experts_window_concatenates_banks_and_gradients_reach_both():
    torch.manual_seed(2)
    owner, layers = build(LayoutConfig(kind="shared_pool", pool_size=3, private_experts=2, pool_loss_coef=0.0),
                          moe_cfg(), 2)
    pool, priv0, priv1 = owner.banks
    assert layers[0].experts.expert_map.tolist() == [0, 1, 2, 3, 4]
    assert layers[1].experts.expert_map.tolist() == [0, 1, 2, 5, 6]
    torch.testing.assert_close(layers[1].experts.w_up_EFD, torch.cat([pool.w_up_EFD, priv1.w_up_EFD]))
    run_stack(layers, torch.randn(30, D)).pow(2).sum().backward()
    for bank in (pool, priv0, priv1):
        assert bank.w_up_EFD.grad is not None and bank.w_up_EFD.grad.abs().sum() > 0


def test_several_pools_split_layers_by_depth():
    plan = plan_layout(LayoutConfig(kind="shared_pool", n_pools=2, pool_fraction=0.5), 4, 2, [0, 1, 2, 3])
    assert plan.banks == (4, 4)  # 0.5 * 4 layers * 4 experts = 8 experts in 2 pools
    assert [lp.segments[0][0] for lp in plan.layers] == [0, 0, 1, 1]
    owner, layers = build(LayoutConfig(kind="shared_pool", n_pools=2, pool_fraction=0.5), moe_cfg(), 4)
    assert [bal.members for bal in owner.balances] == [[0, 1], [2, 3]]
    pools = [owner.banks[0].w_up_EFD, owner.banks[0].w_up_EFD, owner.banks[1].w_up_EFD, owner.banks[1].w_up_EFD]
    assert all(layer.experts.w_up_EFD is w for layer, w in zip(layers, pools))


# --------------------------------------------------------------------------- the pool-level loss
def _routing(expert_TK: list[list[int]], probs_TE: torch.Tensor) -> RoutingResult:
    idx = torch.tensor(expert_TK)
    w = probs_TE.gather(1, idx)
    return RoutingResult.from_topk(idx, w, probs_TE.shape[1], probs_TE=probs_TE)


def test_pool_loss_is_one_at_perfect_pool_balance_and_matches_the_pure_function():
    N, T = 4, 8
    bal = PoolBalance(N, [0, 1], coef=1.0, mode="exact")
    cols, idx = torch.arange(N), torch.arange(N)
    uniform = torch.full((T, N), 1.0 / N)
    entries = []
    for shift in (0, 1):  # two layers, each top-1 round-robin over the pool
        r = _routing([[(t + shift) % N] for t in range(T)], uniform)
        entries.append(bal.layer_usage(r, cols, idx))
    assert exact_pool_loss(entries, N).item() == pytest.approx(1.0)
    counts = sum(e[1] for e in entries)
    probs_sum = sum(e[0] for e in entries)
    assert exact_pool_loss(entries, N).item() == pytest.approx(pool_balance_loss(counts, probs_sum, 2 * T, 1).item())


def test_pool_loss_detects_starved_experts_that_per_layer_balance_misses():
    """Two layers whose windows are experts 0..1 of a pool of 4: each layer is perfectly balanced
    over its own experts (per-layer Switch loss 1.0) but experts 2, 3 of the pool starve."""
    torch.manual_seed(3)
    cfg = moe_cfg(num_experts=2, k=1, aux_loss="none")
    bank = ExpertBank(replace(cfg, num_experts=4))
    bal = PoolBalance(4, [0, 1], coef=1.0, mode="exact")
    layers = [PoolMoELayer(cfg, PooledExperts([bank], [(0, 0, 2)]), layer_index=i, balances=[bal]) for i in range(2)]
    T = 16
    half = torch.full((T, 2), 0.5)
    routings = [_routing([[t % 2] for t in range(T)], half) for _ in range(2)]
    for r in routings:  # each layer alone is balanced
        assert switch_aux_loss(r.probs_TE, r.counts_E()).item() == pytest.approx(1.0)
    entries = [bal.layer_usage(r, layers[0].pool_cols0, layers[0].pool_idx0) for r in routings]
    assert exact_pool_loss(entries, 4).item() == pytest.approx(2.0)
    # the same through the layers: the deepest member attaches the exact value
    ctx = RoutingContext(state={})
    for layer, r in zip(layers, routings):
        layer.balance(r, ctx)
    assert layers[0].balance(routings[0], None)["pool_loss"].item() == pytest.approx(2.0)  # alone: itself only


def _stack_with_hook(mode: str, coef: float = 0.1, L: int = 3):
    torch.manual_seed(4)
    owner, layers = build(LayoutConfig(kind="shared_pool", pool_size=6, pool_loss_coef=coef, pool_loss_mode=mode),
                          moe_cfg(aux_loss="none"), L)
    model = nn.ModuleList([owner, *layers])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    install_aux_free_hook(opt, model)
    return owner, layers, model, opt


def _usage_of_last_forward(owner, layers):
    bal = owner.balances[0]
    out = []
    for j, layer in enumerate(layers):
        out.append(bal.layer_usage(layer.last_routing, layer.pool_cols0, layer.pool_idx0))
    return out


def test_exact_mode_attaches_the_same_step_pool_loss_on_the_last_layer():
    owner, layers, model, opt = _stack_with_hook("exact")
    run_stack(layers, torch.randn(24, D))
    assert "pool_loss" not in layers[0].last_aux and "pool_loss" not in layers[1].last_aux
    # by hand: f = the pool's slot shares over all layers, pbar = the layers' mean softmax over the pool
    counts = sum(torch.bincount(l.last_routing.expert_S, minlength=6).double() for l in layers)
    p_bar = sum(l.last_routing.probs_TE.double().sum(0) for l in layers) / (3 * 24)
    expected = 0.1 * 6 * float((counts / counts.sum() * p_bar).sum())
    assert layers[2].last_aux["pool_loss"].item() == pytest.approx(expected, rel=1e-5)


def test_lagged_mode_uses_the_previous_optimizer_steps_pool_counts():
    owner, layers, model, opt = _stack_with_hook("lagged")
    bal = owner.balances[0]
    x1, x2 = torch.randn(24, D), torch.randn(24, D)
    run_stack(layers, x1).sum().backward()
    assert sum(l.last_aux["pool_loss"].item() for l in layers) == 0.0  # no previous step yet
    counts_step1 = sum(u[1] for u in _usage_of_last_forward(owner, layers))
    opt.step()  # the hook rolls the counts over
    torch.testing.assert_close(bal.prev_count_N, counts_step1)
    run_stack(layers, x2)
    usage = _usage_of_last_forward(owner, layers)
    f = counts_step1 / counts_step1.sum()
    p_bar = sum(u[0] for u in usage) / sum(u[2] for u in usage)
    expected = 0.1 * 6 * (f.float() * p_bar).sum()
    assert sum(l.last_aux["pool_loss"].item() for l in layers) == pytest.approx(expected.item(), rel=1e-5)


def test_lagged_pool_loss_gradient_reaches_each_router_locally():
    owner, layers, model, opt = _stack_with_hook("lagged", coef=1.0, L=2)
    run_stack(layers, torch.randn(24, D)).sum().backward()
    opt.step()
    opt.zero_grad()
    inputs = []
    hooks = [l.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach())) for l in layers]
    out = run_stack(layers, torch.randn(24, D))
    (0.0 * out).sum().backward()  # only the attached pool loss sends gradient
    for h in hooks:
        h.remove()
    bal = owner.balances[0]
    f = (bal.prev_count_N / bal.prev_count_N.sum()).float()
    for layer, x in zip(layers, inputs):
        w = layer.router.gate.weight_ED.detach().clone().requires_grad_(True)
        p = torch.softmax(x @ w.T, -1)
        term = 6 * (f * p.mean(0)).sum() / 2
        (g,) = torch.autograd.grad(term, w)
        torch.testing.assert_close(layer.router.gate.weight_ED.grad, g)


def test_pool_counts_only_accumulate_in_training_with_grad():
    owner, layers, model, opt = _stack_with_hook("lagged")
    with torch.no_grad():
        run_stack(layers, torch.randn(8, D))
    model.eval()
    run_stack(layers, torch.randn(8, D))
    assert float(owner.balances[0].count_N.sum()) == 0.0
    assert sum(owner.balances[0].stats()["counts"]) == 3 * 8 * 2  # reporting still sees the last forward


# --------------------------------------------------------------------------- shared routers
def test_omni_router_is_one_router_whose_gradient_sums_over_layers():
    torch.manual_seed(5)
    cfg = moe_cfg()
    owner, layers = build(LayoutConfig(kind="per_layer", router_sharing="omni"), cfg, 3)
    assert owner is None
    model = nn.ModuleList(layers)
    routers = [k for k in model.state_dict() if "gate.weight_ED" in k]
    assert routers == ["0.router.gate.weight_ED"]
    copies = []
    for layer in layers:
        ref = MoELayer(cfg)
        ref.load_state_dict({**layer.state_dict(), **{f"router.{k}": v for k, v in layers[0].router.state_dict().items()}})
        copies.append(ref)
    x = torch.randn(18, D)
    y, y_ref = run_stack(layers, x), run_stack(copies, x)
    torch.testing.assert_close(y, y_ref)
    y.pow(2).sum().backward()
    y_ref.pow(2).sum().backward()
    torch.testing.assert_close(layers[0].router.gate.weight_ED.grad, sum(c.router.gate.weight_ED.grad for c in copies))


def test_shared_decision_is_reused_by_later_layers():
    torch.manual_seed(6)
    owner, layers = build(LayoutConfig(kind="shared_pool", pool_size=4, router_sharing="decision"), moe_cfg(), 3)
    run_stack(layers, torch.randn(10, D))
    first = layers[0].last_routing
    for layer in layers[1:]:
        assert torch.equal(layer.last_routing.expert_S, first.expert_S)
        assert "aux_loss" not in layer.last_aux
    assert isinstance(layers[1].router, ReusedDecision)
    with pytest.raises(MoelabError, match="shared_decision"):
        layers[1](torch.randn(10, D))


def test_router_sharing_rejects_layers_of_different_sizes():
    with pytest.raises(MoelabError, match="router_sharing='omni'"):
        plan_layout(LayoutConfig(kind="rexmoe", router_sharing="omni"), 4, 2, [0, 1, 2])


# --------------------------------------------------------------------------- shared experts and counts
def test_shared_experts_combine_with_a_pool():
    torch.manual_seed(7)
    cfg = moe_cfg(num_shared_experts=1)
    owner, layers = build(LayoutConfig(kind="shared_pool", pool_fraction=0.5), cfg, 2)
    assert all(l.shared_experts is not None for l in layers)
    x = torch.randn(6, D)
    y = layers[0](x)
    expected = layers[0].dispatch(x, layers[0].last_routing) + layers[0].shared_experts(x)
    torch.testing.assert_close(y, expected)


LAYOUTS = [
    LayoutConfig(),
    LayoutConfig(kind="per_layer", schedule="descending", expert_budget=20),
    LayoutConfig(kind="per_layer", schedule="wave", schedule_k="proportional"),
    LayoutConfig(kind="shared_pool"),
    LayoutConfig(kind="shared_pool", pool_fraction=2 / 3),
    LayoutConfig(kind="shared_pool", pool_size=5, n_pools=2, private_experts=1),
    LayoutConfig(kind="rexmoe", rexmoe_radius=1, schedule="pyramid"),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l.kind}-{l.schedule}-{l.pool_fraction}-{l.n_pools}")
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_parameter_counts_match_the_closed_form(layout, activation):
    cfg = moe_cfg(activation=activation)
    L = 4
    owner, layers = build(layout, cfg, L)
    plan = plan_layout(layout, cfg.num_experts, cfg.k, list(range(L)))
    closed = layout_param_counts(plan, D, F, activation)
    measured = routed_param_counts(layers)
    assert measured["total"] == closed["routed"]
    assert measured["active"] == closed["routed_active"]
    assert sum(l.router.gate.weight_ED.numel() for l in layers) == closed["router"]
    everything = nn.ModuleList([m for m in [owner] if m is not None] + layers)
    shared_gate_params = 0
    total = sum(p.numel() for p in everything.parameters())
    assert total == closed["routed"] + closed["router"] + shared_gate_params
    assert closed["vanilla_routed"] == L * cfg.num_experts * closed["expert_params"]


def test_pool_fraction_sizes_the_pool_against_the_vanilla_budget():
    for frac, P in [(1.0, 32), (2 / 3, 21), (0.5, 16)]:
        plan = plan_layout(LayoutConfig(kind="shared_pool", pool_fraction=frac), 8, 2, [0, 1, 2, 3])
        assert plan.banks == (P,)
        assert layout_param_counts(plan, D, F)["fraction"] == pytest.approx(P / 32)


@pytest.mark.parametrize("schedule", ["uniform", "ascending", "descending", "pyramid", "wave"])
def test_schedules_sum_to_the_budget(schedule):
    plan = plan_layout(LayoutConfig(schedule=schedule, expert_budget=30), 8, 2, [1, 2, 3, 5])
    assert sum(lp.num_experts for lp in plan.layers) == 30
    assert [lp.layer for lp in plan.layers] == [1, 2, 3, 5]
    assert min(lp.num_experts for lp in plan.layers) >= 2


def test_invalid_layouts_give_clear_errors():
    with pytest.raises(MoelabError, match="smaller than moe.k=2"):
        plan_layout(LayoutConfig(kind="shared_pool", pool_size=1), 8, 2, [0, 1])
    with pytest.raises(MoelabError, match="smaller than moe.k=4"):
        plan_layout(LayoutConfig(kind="shared_pool", pool_fraction=0.05), 8, 4, [0, 1, 2, 3])
    with pytest.raises(MoelabError, match="layout.expert_budget=6.*does not fit"):
        plan_layout(LayoutConfig(schedule="pyramid", expert_budget=6), 8, 2, [0, 1, 2, 3])
    with pytest.raises(MoelabError, match="layout.pool_size=4 and layout.pool_fraction=0.5"):
        plan_layout(LayoutConfig(kind="shared_pool", pool_size=4, pool_fraction=0.5), 8, 2, [0, 1])
    with pytest.raises(MoelabError, match="layout.n_pools=3"):
        plan_layout(LayoutConfig(kind="shared_pool", n_pools=3), 8, 2, [0, 1])
    with pytest.raises(MoelabError, match="layout.kind='pool'.*'shared_pool'"):
        plan_layout(LayoutConfig(kind="pool"), 8, 2, [0, 1])
    with pytest.raises(MoelabError, match="layout.pool_loss_mode"):
        plan_layout(LayoutConfig(kind="shared_pool", pool_loss_mode="sync"), 8, 2, [0, 1])
    with pytest.raises(MoelabError, match="shared_pool' is sized by"):
        plan_layout(LayoutConfig(kind="shared_pool", schedule="pyramid"), 8, 2, [0, 1])


def test_state_dict_holds_each_pool_once_and_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(8)
    layout = LayoutConfig(kind="shared_pool", pool_fraction=0.5, private_experts=1)
    owner, layers = build(layout, moe_cfg(router="norm"), 3)
    model = nn.ModuleList([owner, *layers])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    torch.manual_seed(9)
    owner2, layers2 = build(layout, moe_cfg(router="norm"), 3)
    model2 = nn.ModuleList([owner2, *layers2])
    model2.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    x = torch.randn(7, D)
    torch.testing.assert_close(run_stack(layers, x), run_stack(layers2, x))


def test_routings_without_probabilities_need_a_zero_pool_loss_coefficient():
    r = RoutingResult.from_topk(torch.tensor([[0, 1], [2, 3], [1, 2]]), torch.ones(3, 2), 4)
    cols = idx = torch.arange(4)
    _, counts, n = PoolBalance(4, [0, 1], coef=0.0).layer_usage(r, cols, idx)
    assert counts.tolist() == [1, 2, 2, 1] and n == 3
    with pytest.raises(MoelabError, match="pool_loss_coef=0"):
        PoolBalance(4, [0, 1], coef=0.1).layer_usage(r, cols, idx)
