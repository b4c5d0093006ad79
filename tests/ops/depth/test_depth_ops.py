"""Depth-routing operations (moelab.ops.depth): search and training pieces against independent oracles, and the
whole operation on a real micro run (save / load, eval and generate accept RUN2, determinism, bad input)."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
import torch.nn.functional as F

from moelab.errors import MoelabError
from moelab.models.depth import depth_routers
from moelab.ops.depth import DEPTH_METHODS, DepthConfig, Windows
from moelab.ops.depth.base import class_weights, focal_loss
from moelab.ops.depth.drllm import mcts
from moelab.ops.depth.duo import oracle_analysis, pattern_cost

QUICK = {"drllm": {"simulations": 12}, "router_tuning": {}, "duo": {"small_steps": 20}}


def test_registry_and_static_cli_listing_agree():
    from moelab.cli import depth_route

    assert depth_route.LISTING == [(e.name, e.description, e.paper) for e in DEPTH_METHODS.entries()]


@pytest.mark.parametrize("budget", [0, -0.5, 1.5, float("nan"), "x"])
def test_budget_outside_0_1_is_a_clear_error(budget):
    with pytest.raises(MoelabError, match=r"budget=.*\(0, 1\]"):
        DepthConfig(method="drllm", budget=budget).validate()


def test_unknown_method_names_the_choices():
    with pytest.raises(MoelabError, match="method.*drllm.*duo|method.*duo.*drllm"):
        DepthConfig(method="mod").validate()
    assert DepthConfig(method="router-tuning").validate().method == "router_tuning"


def test_focal_loss_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(7, 3, generator=g), torch.tensor([0, 1, 2, 1, 1, 0, 2])
    torch.testing.assert_close(focal_loss(z, y, gamma=0.0), F.cross_entropy(z, y))
    p = torch.softmax(z, -1)[torch.arange(7), y]
    w = torch.tensor([1.0, 2.0, 0.5])
    want = (w[y] * (1 - p) ** 2 * -p.log()).sum() / w[y].sum()
    torch.testing.assert_close(focal_loss(z, y, 2.0, w), want)
    cw = class_weights(torch.tensor([1, 1, 1, 0]), 3)
    torch.testing.assert_close(cw, torch.tensor([2.0, 2 / 3, 0.0]))


def test_mcts_finds_the_brute_force_best_within_the_budget():
    rng = random.Random(0)
    table = {c: rng.random() for c in itertools.product((0, 1, 2), repeat=3)}
    for cap in (1, 2, 3, 5):
        feasible = {c: r for c, r in table.items() if sum(c) <= cap}
        got = mcts(3, cap, table.__getitem__, simulations=400, c=0.5, rng=random.Random(1))
        assert sum(got) <= cap
        assert got == max(feasible, key=feasible.get)


def test_duo_oracle_analysis_on_a_hand_made_loss_table():
    pats = list(itertools.product((0, 1, 2), repeat=2))
    losses = torch.full((9, 1, 2), 5.0)
    idx = {p: i for i, p in enumerate(pats)}
    losses[idx[(2, 2)]] = torch.tensor([[3.0, 2.0]])  # base
    losses[idx[(1, 2)]] = torch.tensor([[2.5, 4.0]])  # one big + small: beats base on token 0
    losses[idx[(1, 1)]] = torch.tensor([[4.0, 1.0]])  # no big: best on token 1
    cost = pattern_cost(pats, 0.25)
    arg, info = oracle_analysis(losses, pats, cost, budget=0.75)
    assert [pats[k] for k in arg[0].tolist()] == [(1, 2), (1, 1)]
    assert info["oracle_loss"] == pytest.approx((2.5 + 1.0) / 2) and info["base_loss"] == pytest.approx(2.5)
    assert info["one_big_beats_all_big_frac"] == pytest.approx(0.5)
    assert info["benefit_from_big_frac"] == pytest.approx(0.5)  # token 0 gains 1.5 nats, token 1 none


def _toy_windows(n=8, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Windows(torch.randint(0, 61, (n, L), generator=g), L // 2, ["a", "b"] * (n // 2))


@pytest.fixture
def toy():
    from moelab.layers.config import MoEConfig
    from moelab.models.config import ModelConfig
    from moelab.models.transformer import MoETransformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=3, n_heads=2, max_seq_len=32, d_ff_dense=48,
                      moe=MoEConfig(d_ff=16, num_experts=4, k=2), moe_layers=[0, 2]).validate()
    return MoETransformer(cfg).eval()


@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_router_tuning_gradients_reach_only_the_routers(toy, granularity):
    from moelab.ops.depth.run import apply_depth

    before = {k: v.clone() for k, v in toy.state_dict().items()}
    cfg = DepthConfig(method="router_tuning", budget=0.5, steps=3, batch_size=4, options={"granularity": granularity})
    apply_depth(toy, cfg, _toy_windows())
    for name, p in toy.named_parameters():
        if ".depth." in name:
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
        else:
            assert p.grad is None or float(p.grad.abs().sum()) == 0, name
            assert torch.equal(p, before[name]), name


def test_router_tuning_ste_gradient_matches_the_chain_rule(toy):
    """d loss / d gate = sum over sequences of (d loss / d mask) x sigmoid'(logit) x pooled input."""
    from moelab.models.depth import forcing, install_depth
    from moelab.ops.depth.base import continuation_losses

    install_depth(toy, {"method": "router_tuning"})
    r = toy.blocks[1].depth
    r.train()
    w = _toy_windows(n=4)
    continuation_losses(toy, w.ids_NL, w.prompt_len).mean().backward()
    got = r.gate.weight.grad.clone()
    hard = (r.last_scores.detach() >= 0.5).float()  # [B, 1]
    m = hard.clone().requires_grad_(True)
    r.eval()
    with forcing(toy, {1: m}):
        torch.set_grad_enabled(True)
        continuation_losses(toy, w.ids_NL, w.prompt_len).mean().backward()
    pooled = []
    hook = toy.blocks[1].attn_norm.register_forward_hook(lambda _m, _a, h: pooled.append(h[:, : w.prompt_len].mean(1)))
    with torch.no_grad(), forcing(toy, {1: hard}):
        continuation_losses(toy, w.ids_NL, w.prompt_len)
    hook.remove()
    s = r.last_scores.detach()
    want = ((m.grad * s * (1 - s)) * pooled[0]).sum(0, keepdim=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- the whole operation on a real run
def _route(micro_run, out, method, **kw):
    from moelab.ops.depth.run import depth_route

    cfg = DepthConfig(method=method, budget=kw.pop("budget", 0.75), train_windows=8, eval_windows=2, steps=5,
                      batch_size=4, options=QUICK[method], **kw)
    return depth_route(micro_run, out, cfg)


@pytest.mark.parametrize("method", ["drllm", "router_tuning", "duo"])
def test_depth_routed_run_saves_and_loads(micro_run, tmp_path, method):
    from moelab.ops.depth.base import make_windows
    from moelab.ops.depth.evaluate import score
    from moelab.train.run import load_run

    manifest, md = _route(micro_run, tmp_path / "r2", method)
    assert "unmodified" in md and method in md
    loaded = load_run(tmp_path / "r2")
    assert loaded.config.model.depth == manifest["spec"] and len(depth_routers(loaded.model)) == 2
    evals = make_windows(loaded, "test", 2, seed=0)
    res = score(loaded.model, evals, "again", 4)
    assert res.loss() == pytest.approx(manifest["results"][1]["loss"], rel=1e-5)
    assert res.per_token("flops") == pytest.approx(manifest["results"][1]["flops_per_token"], rel=1e-6)
    assert json.loads((tmp_path / "r2" / "depth_route.json").read_text())["method"] == method


def test_eval_and_generate_accept_a_depth_routed_run(micro_run, tmp_path, capsys):
    from moelab.cli.main import main

    _route(micro_run, tmp_path / "r2", "drllm")
    assert main(["eval", str(tmp_path / "r2"), "--split", "test", "--max-batches", "1", "--json"]) == 0
    assert main(["generate", str(tmp_path / "r2"), "--prompt", "ab", "--max-new-tokens", "5", "--temperature", "0"]) == 0


def test_depth_routing_is_deterministic_under_a_seed(micro_run, tmp_path):
    from moelab.train.run import load_run

    a, _ = _route(micro_run, tmp_path / "a", "drllm", seed=3)
    b, _ = _route(micro_run, tmp_path / "b", "drllm", seed=3)
    for x, y in zip(a["results"], b["results"]):  # everything but the wall-clock seconds
        assert {k: v for k, v in x.items() if k != "seconds"} == {k: v for k, v in y.items() if k != "seconds"}
    assert a["fit"] == b["fit"]
    sa, sb = load_run(tmp_path / "a").model.state_dict(), load_run(tmp_path / "b").model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cli_bad_budget_is_a_named_error(micro_run, tmp_path, capsys):
    from moelab.cli.main import main

    assert main(["depth-route", str(micro_run), "--method", "duo", "--budget", "1.2", "--out", str(tmp_path / "x")]) == 2
    assert "budget=1.2" in capsys.readouterr().err
    assert main(["depth-route", str(micro_run), "--method", "mod", "--out", str(tmp_path / "x")]) == 2
    assert "method" in capsys.readouterr().err


def test_mcts_never_returns_worse_than_executing_everything_when_the_budget_allows_it():
    table = {c: (1.0 if c == (1, 1, 1) else 0.0) for c in itertools.product((0, 1, 2), repeat=3)}
    assert mcts(3, 3, table.__getitem__, simulations=1, c=0.5, rng=random.Random(0)) == (1, 1, 1)
    assert mcts(3, 2, table.__getitem__, simulations=1, c=0.5, rng=random.Random(0)) != (1, 1, 1)
