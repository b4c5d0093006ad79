"""Issue 13: every router's ``causal`` flag, in training and in eval mode, against an empirical oracle.

Oracle: route a sequence, then the same sequence with its tokens after position ``P`` changed
(random, or copies of an earlier token that compete with it for experts), from the same router
state and random seed. A causal router gives the first ``P`` tokens identical experts and weights
every time; a router flagged non-causal must show a difference. (Same length throughout: random
draws such as noisy top-k's noise depend on the tensor size, not on causality.) Table-driven over the whole router registry.
"""

import copy

import pytest
import torch

from moelab.layers.config import MoEConfig
from moelab.layers.moe import MoELayer
from moelab.layers.routers import ROUTERS
from moelab.layers.routing import RoutingContext

D, L, P = 16, 12, 5
EXTRA = {"smear_token": ("smear", {"merge": "token"}),
         "expert_choice_native_eval": ("expert_choice", {"eval_routing": "expert_choice"})}
CASES = sorted(ROUTERS.names()) + sorted(EXTRA)


def _layer(case: str) -> MoELayer:
    name, kw = EXTRA.get(case, (case, {}))
    torch.manual_seed(0)
    return MoELayer(MoEConfig(d_model=D, d_ff=24, num_experts=4, k=2, router=name, router_kwargs=kw, init_std=0.5))


def _routing(layer: MoELayer, x_LD: torch.Tensor, ids_L: torch.Tensor) -> dict:
    layer = copy.deepcopy(layer)  # same state (bias, centroids, q, step counters) for every call
    torch.manual_seed(1)  # same noise / random draws
    n = x_LD.shape[0]
    ctx = RoutingContext(batch_shape=(1, n), token_ids_T=ids_L[:n], state={})
    layer(x_LD, ctx)
    r = layer.last_routing
    keep = r.keep_S if r.keep_S is not None else torch.ones_like(r.token_S, dtype=torch.bool)
    return {(int(t), int(e)): float(w) for t, e, w, k in zip(r.token_S, r.expert_S, r.weight_S, keep)
            if t < P and k and float(w) != 0.0}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(abs(a[key] - b[key]) < 1e-5 for key in a)


def _is_empirically_causal(layer: MoELayer) -> bool:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(L, D, generator=g)
    ids = torch.randint(0, 50, (L,), generator=g)
    full = _routing(layer, x, ids)
    for t in range(P + 1):  # later tokens: random, or copies of an early token that compete with it
        changed = x.clone()
        changed[P:] = 5.0 * torch.randn(L - P, D, generator=g) if t == P else 3.0 * x[t]
        if not _same(full, _routing(layer, changed, ids)):
            return False
    return True


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES)
def test_causal_flag_matches_behaviour(case, training):
    layer = _layer(case).train(training)
    flag = layer.router.is_causal()
    assert flag == layer.router.is_causal(training)
    assert _is_empirically_causal(layer) == flag, f"{case} ({'train' if training else 'eval'}): flag {flag}"
    layer(torch.randn(L, D), RoutingContext(batch_shape=(1, L), token_ids_T=torch.zeros(L, dtype=torch.long)))
    assert layer.last_routing.causal == flag  # the result carries the mode's flag


def test_flags_of_the_known_non_causal_routers():
    table = {"expert_choice": (False, True), "smear": (False, False), "sinkhorn": (False, True),
             "base": (False, True), "bip": (False, True), "softmax_topk": (True, True)}
    for name, (train_flag, eval_flag) in table.items():
        router = _layer(name).router
        assert (router.is_causal(True), router.is_causal(False)) == (train_flag, eval_flag), name


def test_expert_choice_eval_mode_is_token_choice_over_the_same_scores():
    layer = _layer("expert_choice").eval()
    x = torch.randn(L, D)
    layer(x, RoutingContext(batch_shape=(1, L)))
    r = layer.last_routing
    probs = torch.softmax(x @ layer.router.gate.weight_ED.detach().T, -1)
    top = probs.topk(2, -1)
    assert r.k == 2 and torch.equal(r.expert_S.view(L, 2), top.indices)
    assert torch.allclose(r.weight_S.view(L, 2), top.values, atol=1e-6)
