"""The no-grad path of the sorted/grouped dispatch (plain function, no autograd.Function) must give
bit-identical outputs to the autograd path, and the autograd path must still match the loop oracle
in outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from moelab.layers.config import MoEConfig
from moelab.layers.dispatch import DISPATCHERS
from moelab.layers.experts import ExpertBank
from moelab.layers.routing import RoutingResult


def _setup(d_ff: int, activation: str, seed: int = 0):
    torch.manual_seed(seed)
    E, D, T, K = 5, 16, 23, 2
    bank = ExpertBank(MoEConfig(d_model=D, d_ff=d_ff, num_experts=E, k=K, activation=activation, init_std=0.3))
    x = torch.randn(T, D)
    w_TK, idx_TK = torch.softmax(torch.randn(T, E), -1).topk(K, -1)
    return bank, x, RoutingResult.from_topk(idx_TK, w_TK, E)


@pytest.mark.parametrize("backend", ["sorted", "grouped"])
@pytest.mark.parametrize("d_ff,activation", [(8, "swiglu"), (32, "swiglu"), (12, "gelu"), (40, "gelu")])
def test_nograd_path_equals_autograd_path(backend, d_ff, activation):
    bank, x, r = _setup(d_ff, activation)
    fn = DISPATCHERS.get(backend)
    with torch.no_grad():
        y_fast = fn(x, r, bank)
    y_graph = fn(x.clone().requires_grad_(), r, bank)
    assert y_graph.requires_grad and not y_fast.requires_grad
    torch.testing.assert_close(y_fast, y_graph.detach(), rtol=0, atol=0)
    frozen = [p.requires_grad_(False) for p in bank.parameters()]  # nothing requires grad: fast path too
    y_frozen = fn(x, r, bank)
    assert not y_frozen.requires_grad and len(frozen) == (3 if activation == "swiglu" else 2)
    torch.testing.assert_close(y_frozen, y_graph.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["sorted", "grouped"])
@pytest.mark.parametrize("d_ff", [8, 32])
def test_autograd_path_matches_loop_outputs_and_grads(backend, d_ff):
    bank, x, r = _setup(d_ff, "swiglu", seed=1)
    w = r.weight_S.clone().requires_grad_()

    def run(name):
        bank.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        rr = RoutingResult(token_S=r.token_S, expert_S=r.expert_S, weight_S=w, num_tokens=r.num_tokens,
                           num_experts=r.num_experts, k=r.k)
        w.grad = None
        y = DISPATCHERS.get(name)(xx, rr, bank)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return [y.detach(), xx.grad, w.grad] + [p.grad for p in bank.parameters()]

    for a, b in zip(run(backend), run("loop")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
