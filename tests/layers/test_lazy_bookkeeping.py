"""MoELayer's ``last_stats`` (and, without grad, ``last_aux``) are computed on first read: the values
must equal the eager computation on the same forward (oracles: ``routing_stats`` and
``balance_losses`` called directly), survive in-place bias updates, and follow the latest forward."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.layers.balancing import balance_losses
from moelab.layers.config import MoEConfig
from moelab.layers.moe import MoELayer
from moelab.layers.routing import RoutingContext
from moelab.layers.stats import routing_stats


def cfg_(**kw):
    base = dict(d_model=16, d_ff=24, num_experts=4, k=2, init_std=0.3, aux_loss_coef=0.1, z_loss_coef=0.01)
    base.update(kw)
    return MoEConfig(**base)


def _same_stats(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float) and math.isnan(a[key]):
            assert math.isnan(b[key]), key
        else:
            assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-12), key


def _eager_aux(layer: MoELayer, x: torch.Tensor, ctx: RoutingContext | None) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        routing = layer.router(x.reshape(-1, layer.cfg.d_model), ctx)
        return balance_losses(routing, layer.cfg, ctx)


@pytest.mark.parametrize("grad", [True, False])
def test_lazy_stats_equal_routing_stats_of_the_forward(grad):
    torch.manual_seed(0)
    layer = MoELayer(cfg_())
    x = torch.randn(3, 7, 16)
    with torch.set_grad_enabled(grad):
        layer(x)
    assert layer.__dict__["_pending_stats"] is not None  # nothing computed yet
    _same_stats(layer.last_stats, routing_stats(layer.last_routing))
    assert layer.__dict__["_pending_stats"] is None
    assert sum(layer.last_stats["counts"]) == 3 * 7 * 2


def test_lazy_stats_follow_the_latest_forward():
    torch.manual_seed(1)
    layer = MoELayer(cfg_(num_experts=8))
    layer(torch.randn(5, 16))
    layer(torch.randn(9, 16))
    assert sum(layer.last_stats["counts"]) == 9 * 2
    layer.last_stats = {"replaced": 1}  # a subclass or a caller may overwrite the dict
    assert layer.last_stats == {"replaced": 1}


def test_lazy_stats_keep_the_bias_of_their_forward():
    """``bias_norm`` is that of the bias the forward routed with, even when the aux-free update
    changes the bias in place before ``last_stats`` is first read."""
    torch.manual_seed(2)
    layer = MoELayer(cfg_(router="sigmoid_topk", aux_loss="none", aux_free_bias=True, bias_update_rate=0.5))
    layer.router.aux_free.bias_E.copy_(torch.tensor([0.3, -0.1, 0.0, -0.2]))
    before = float(layer.router.aux_free.bias_E.double().norm())
    layer.train()
    layer(torch.randn(20, 16)).sum().backward()
    layer.router.aux_free.bias_E.add_(1.0)  # what the optimizer step's bias update does (in place)
    assert layer.last_stats["bias_norm"] == pytest.approx(before, rel=1e-12)


def test_track_stats_off_gives_no_stats_and_no_nograd_aux():
    layer = MoELayer(cfg_())
    layer.track_stats = False
    with torch.no_grad():
        layer(torch.randn(4, 16))
    assert layer.last_stats == {} and layer.last_aux == {}


@pytest.mark.parametrize("aux_loss", ["switch", "sequence"])
def test_nograd_aux_is_deferred_and_equals_eager(aux_loss):
    torch.manual_seed(3)
    layer = MoELayer(cfg_(aux_loss=aux_loss)).eval()
    x = torch.randn(2, 6, 16)
    ctx = RoutingContext(batch_shape=(2, 6), valid_T=torch.arange(12) % 5 != 0)
    with torch.no_grad():
        layer(x, ctx)
    assert layer.__dict__["_pending_aux"] is not None
    want = _eager_aux(layer, x, ctx)
    got = layer.last_aux
    assert set(got) == {"aux_loss", "z_loss"} == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
        assert not got[k].requires_grad


def test_grad_aux_is_eager_and_reaches_the_router():
    torch.manual_seed(4)
    layer = MoELayer(cfg_())
    x = torch.randn(10, 16)
    layer(x).sum().backward()
    assert layer.__dict__["_pending_aux"] is None and set(layer.last_aux) == {"aux_loss", "z_loss"}
    assert layer.router.gate.weight_ED.grad is not None
    want = _eager_aux(layer, x, None)
    for k in want:
        torch.testing.assert_close(layer.last_aux[k], want[k])


def test_global_aux_is_not_deferred():
    """``aux_loss="global"`` reads the router's step accumulator, which later forwards change."""
    layer = MoELayer(cfg_(aux_loss="global")).eval()
    with torch.no_grad():
        layer(torch.randn(6, 16))
    assert layer.__dict__["_pending_aux"] is None and "aux_loss" in layer.last_aux
