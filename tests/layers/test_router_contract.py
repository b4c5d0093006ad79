"""The routing contract, checked for every registered router (zoo routers added later included)."""

import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moelab.errors import MoelabError
from moelab.layers.config import MoEConfig
from moelab.layers.routers import ROUTERS, Router, build_router
from moelab.layers.routing import RoutingContext, RoutingResult

D = 16


def _ctx(B, L, valid_BL=None, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B * L,), generator=g)
    valid = None if valid_BL is None else valid_BL.reshape(-1)
    return RoutingContext(valid_T=valid, batch_shape=(B, L), token_ids_T=ids)


def _route(name, E=8, k=2, B=2, L=6, seed=0, x_dtype=torch.float32, valid_BL=None, train=True):
    torch.manual_seed(seed)
    router = build_router(MoEConfig(d_model=D, num_experts=E, k=k, router=name))
    router.train(train)
    x = torch.randn(B * L, D).to(x_dtype)
    return router, router(x, _ctx(B, L, valid_BL, seed=seed))


@pytest.mark.parametrize("name", ROUTERS.names())
def test_contract_shapes_ranges_and_counts(name):
    E, k, B, L = 8, 2, 2, 6
    router, r = _route(name, E, k, B, L)
    assert isinstance(router, Router) and isinstance(r, RoutingResult)
    r.validate()  # indices in range, sorted, no duplicate expert per token, weights finite and >= 0
    assert r.num_tokens == B * L and r.num_experts == E
    assert r.expert_S.dtype == torch.long and r.token_S.dtype == torch.long
    if r.k is not None:
        assert r.num_slots == B * L * r.k
    assert int(r.routed_counts_E().sum()) == r.num_slots
    assert int(r.counts_E().sum()) == (r.num_slots if r.keep_S is None else int(r.keep_S.sum()))
    assert r.causal == type(router).causal
    for t in (r.logits_TE, r.probs_TE):
        if t is not None:
            assert t.shape == (B * L, E) and bool(torch.isfinite(t).all())


@pytest.mark.parametrize("name", ROUTERS.names())
def test_contract_deterministic_under_seed(name):
    _, a = _route(name, seed=3)
    _, b = _route(name, seed=3)
    assert torch.equal(a.token_S, b.token_S) and torch.equal(a.expert_S, b.expert_S)
    assert torch.equal(a.weight_S, b.weight_S)


@pytest.mark.parametrize("name", ROUTERS.names())
def test_contract_fp32_router_math_under_bf16_input(name):
    _, r = _route(name, x_dtype=torch.bfloat16)
    r.validate()
    if r.logits_TE is not None:
        assert r.logits_TE.dtype == torch.float32
    if r.probs_TE is not None:
        assert r.probs_TE.dtype == torch.float32


@pytest.mark.parametrize("name", ROUTERS.names())
def test_contract_padding_is_marked(name):
    valid = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    _, r = _route(name, valid_BL=valid)
    r.validate()
    assert r.valid_T is not None and torch.equal(r.valid_T, valid.reshape(-1))
    real_slots = int(valid.reshape(-1)[r.token_S].sum())
    assert int(r.routed_counts_E().sum()) == real_slots


@pytest.mark.parametrize("name", ROUTERS.names())
def test_contract_gradients_are_finite(name):
    router, r = _route(name)
    if not r.weight_S.requires_grad:
        pytest.skip("weights do not depend on parameters")
    (r.weight_S * torch.linspace(0.5, 1.5, r.num_slots)).sum().backward()
    for p in router.parameters():
        if p.grad is not None:
            assert bool(torch.isfinite(p.grad).all())


@pytest.mark.parametrize("name", ROUTERS.names())
def test_contract_rejects_bad_input(name):
    router = build_router(MoEConfig(d_model=D, num_experts=4, k=2, router=name))
    ctx = _ctx(1, 5)
    with pytest.raises(MoelabError, match="d_model"):
        router(torch.randn(5, D + 1), ctx)
    with pytest.raises(MoelabError, match="x_TD"):
        router(torch.randn(1, 5, D), ctx)


@pytest.mark.parametrize("name", ROUTERS.names())
def test_contract_registry_entry_documents_the_router(name):
    entry = ROUTERS.entry(name)
    assert entry.description and entry.paper
    assert issubclass(entry.obj, Router)
    assert entry.obj.__doc__ or sys.modules[entry.obj.__module__].__doc__


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), name=st.sampled_from(ROUTERS.names()))
def test_contract_property_random_sizes(data, name):
    E = data.draw(st.integers(1, 10), label="E")
    k = data.draw(st.integers(1, E), label="k")
    B = data.draw(st.integers(1, 3), label="B")
    L = data.draw(st.integers(1, 9), label="L")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    try:
        router, r = _route(name, E, k, B, L, seed=seed)
    except MoelabError:
        return  # the router documents a constraint this (E, k) violates
    r.validate()
    assert r.num_tokens == B * L and r.num_experts == E
    if r.k is not None:
        assert r.num_slots == B * L * r.k
    assert int(r.routed_counts_E().sum()) == r.num_slots
