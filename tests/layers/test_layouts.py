import pytest
import torch

from moelab.errors import MoelabError
from moelab.layers.balancing import switch_aux_loss
from moelab.layers.layouts import SCHEDULES, expert_schedule, pool_balance_loss, schedule_shape


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("n_layers,budget,k", [(4, 32, 2), (6, 48, 2), (5, 23, 1), (8, 64, 8)])
def test_schedules_sum_to_budget_and_respect_minimum(kind, n_layers, budget, k):
    counts = expert_schedule(kind, n_layers, budget, min_experts=k)
    assert sum(counts) == budget
    assert len(counts) == n_layers
    assert min(counts) >= k


def test_schedule_shapes_have_their_named_form():
    asc = expert_schedule("ascending", 4, 40)
    assert asc == sorted(asc) and asc[0] < asc[-1]
    assert expert_schedule("descending", 4, 40) == asc[::-1]
    pyr = expert_schedule("pyramid", 5, 50)
    assert pyr[2] == max(pyr) and pyr[0] < pyr[2] and pyr[4] < pyr[2]
    hg = expert_schedule("hourglass", 5, 50)
    assert hg[2] == min(hg)
    assert expert_schedule("uniform", 4, 32) == [8, 8, 8, 8]
    wave = schedule_shape("wave", 8)
    assert wave[0] == max(wave) and wave[4] == min(wave)


def test_schedule_errors_name_the_problem():
    with pytest.raises(MoelabError, match="budget=5"):
        expert_schedule("uniform", 4, 5, min_experts=2)
    with pytest.raises(MoelabError, match="schedule='zigzag'.*uniform"):
        expert_schedule("zigzag", 4, 32)


def test_pool_loss_is_one_at_perfect_balance():
    P, k, T = 16, 2, 64  # 64 (layer, token) pairs, each picks 2 of 16 pool experts
    counts = torch.full((P,), k * T / P)
    probs_sum = torch.full((P,), T / P)
    assert pool_balance_loss(counts, probs_sum, T, k).item() == pytest.approx(1.0)


def test_pool_loss_detects_starvation_hidden_by_per_layer_balance():
    # Two layers, pool of 8: each layer balances perfectly over experts 0..3 only.
    P, k, T_layer = 8, 1, 40
    counts = torch.zeros(P)
    counts[:4] = 2 * T_layer / 4  # both layers together
    probs_sum = torch.zeros(P)
    probs_sum[:4] = 2 * T_layer / 4
    # each layer, over its own 4 experts, is balanced: the library's Switch loss of one layer's routing
    probs_TE = torch.full((T_layer, 4), 0.25)
    per_layer = switch_aux_loss(probs_TE, torch.full((4,), T_layer / 4))
    assert per_layer.item() == pytest.approx(1.0)
    assert pool_balance_loss(counts, probs_sum, 2 * T_layer, k).item() == pytest.approx(2.0)
