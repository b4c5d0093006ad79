"""relu router (ReMoE): ReLU gates, adaptive L1 coefficient, regulariser steers active experts to k."""

import pytest
import torch

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.layers.routers import build_router
from moelab.layers.routing import RoutingContext


def cfg(**kw):
    base = dict(d_model=8, d_ff=16, num_experts=8, k=2, router="relu")
    base.update(kw)
    return MoEConfig(**base)


def test_gates_weights_and_gradients_match_dense_relu():
    torch.manual_seed(0)
    r = build_router(cfg())
    x = torch.randn(12, 8)
    res = r(x).validate()
    C = torch.randn(12, 8)
    (res.dense_TE() * C).sum().backward()
    W = r.gate.weight_ED.detach().clone().requires_grad_(True)
    dense = torch.relu(x @ W.t())
    assert torch.allclose(res.dense_TE().detach(), dense.detach(), atol=1e-6)
    assert torch.equal(res.experts_per_token_T(), (dense > 0).sum(-1))
    (dense * C).sum().backward()
    assert torch.allclose(r.gate.weight_ED.grad, W.grad, atol=1e-6)


def test_regulariser_is_coef_times_load_balanced_l1_over_real_tokens():
    torch.manual_seed(1)
    r = build_router(cfg(router_kwargs={"l1_init": 0.5}))
    r.eval()  # no coefficient update
    x = torch.randn(10, 8)
    valid = torch.tensor([True] * 7 + [False] * 3)
    res = r(x, RoutingContext(valid_T=valid))
    g = torch.relu(x @ r.gate.weight_ED.detach().t())[valid]
    f = (g > 0).float().sum(0) * 8 / (2 * 7)
    assert torch.allclose(res.aux_losses["relu_l1"], 0.5 * (g * f).sum(-1).mean(), atol=1e-6)
    r2 = build_router(cfg(router_kwargs={"l1_init": 0.5, "load_balance": False})).eval()
    r2.load_state_dict(r.state_dict())
    assert torch.allclose(r2(x, RoutingContext(valid_T=valid)).aux_losses["relu_l1"], 0.5 * g.sum(-1).mean(), atol=1e-6)


def test_coefficient_updates_multiplicatively_in_training_only():
    r = build_router(cfg(router_kwargs={"l1_init": 1e-3, "l1_alpha": 2.0}))
    with torch.no_grad():
        r.gate.weight_ED.fill_(1.0)
    x_dense = torch.ones(4, 8)        # every gate positive: too many active -> coefficient grows
    r(x_dense)
    assert float(r.l1_coef) == pytest.approx(2e-3)
    r(-x_dense)                        # nothing active: too sparse -> coefficient shrinks
    assert float(r.l1_coef) == pytest.approx(1e-3)
    r.eval()
    r(x_dense)
    assert float(r.l1_coef) == pytest.approx(1e-3)
    r.train()
    with torch.no_grad():
        r(x_dense)                     # grad disabled: no update either
    assert float(r.l1_coef) == pytest.approx(1e-3)
    # padding never counts: a dense padding token next to an empty real token shrinks it
    x = torch.stack([-torch.ones(8), torch.ones(8)])
    r(x, RoutingContext(valid_T=torch.tensor([True, False])))
    assert float(r.l1_coef) == pytest.approx(5e-4)


def test_regulariser_moves_active_count_to_target():
    """A dense regression target (which alone keeps ~5 of 8 experts on) vs. the adaptive L1:
    the coefficient rises until the mean active count settles near k=2."""
    torch.manual_seed(2)
    r = build_router(cfg(init_std=0.3, router_kwargs={"l1_init": 1e-4, "l1_alpha": 1.2}))
    x = torch.randn(128, 8)
    x[:, 0] = 1.0  # a constant feature acts as a gate bias
    A = torch.randn(8, 8)
    A[:, 0] = 1.0
    y = x @ A.t()
    opt = torch.optim.SGD(r.parameters(), lr=0.05)
    counts = []
    for _ in range(200):
        opt.zero_grad()
        res = r(x)
        task = ((res.dense_TE() - y) ** 2).sum(-1).mean()
        (task + res.aux_losses["relu_l1"]).backward()
        opt.step()
        counts.append(float(res.experts_per_token_T().float().mean()))
    peak, end = max(counts[:60]), sum(counts[-80:]) / 80
    assert peak > 4.0
    assert abs(end - 2.0) < 0.5
    assert float(r.l1_coef) > 1e-2


@pytest.mark.parametrize("kw", [{"target_k": 0}, {"target_k": 9}, {"l1_alpha": 1.0}, {"l1_init": 0.0}])
def test_bad_kwargs_raise(kw):
    with pytest.raises(MoelabError):
        build_router(cfg(router_kwargs=kw))


def test_layer_balance_loss_is_replaced_by_the_l1():
    r = build_router(cfg(aux_loss="switch", aux_loss_coef=0.1, z_loss_coef=0.01))
    res = r(torch.randn(6, 8))
    assert set(r.balance_losses(res)) == {"z_loss"} and "relu_l1" in res.aux_losses
