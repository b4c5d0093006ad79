"""Pruning: plans, oracles (unused expert, keep=1.0), guards, errors, and a pruned run's life cycle."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from ops_helpers import Stack, moe_cfg

from moelab.errors import MoelabError
from moelab.layers.moe import MoELayer
from moelab.models.moe_protocol import get_site, moe_layers
from moelab.ops.calibrate import CalibrationConfig, LayerStats, calibrate
from moelab.ops.prune import PruneConfig, plan_pruning, prune_model, top_experts
from moelab.ops.prune.super_experts import super_experts


def _stats(model, windows):
    return calibrate(model, windows, CalibrationConfig(progress=False, sample_tokens=16))


def test_pruning_an_expert_that_gets_no_token_leaves_outputs_unchanged(windows):
    torch.manual_seed(0)
    layer = MoELayer(moe_cfg(num_experts=4, k=2))
    model = Stack([layer]).eval()
    with torch.no_grad():
        model.emb.weight.abs_()                       # positive inputs ...
        layer.router.gate.weight_ED[2] = -5.0         # ... so expert 2's logit is always the lowest
    st = _stats(model, windows)
    assert st[0].count_E[2] == 0 and (st[0].count_E[[0, 1, 3]] > 0).all()
    before = model(windows.ids_NL).logits
    plan = plan_pruning(model, st, PruneConfig(criterion="frequency", keep=3))
    assert plan == {0: [0, 1, 3]}
    prune_model(model, plan, PruneConfig(criterion="frequency", keep=3))
    assert model.blocks[0].cfg.num_experts == 3 and model.blocks[0].router.gate.weight_ED.shape == (3, 16)
    torch.testing.assert_close(model(windows.ids_NL).logits, before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("criterion", ["frequency", "soft_count", "ean", "reap", "easy_ep", "tcess"])
def test_keep_one_is_the_identity(toy_model, windows, criterion):
    st = _stats(toy_model, windows)
    before = toy_model(windows.ids_NL).logits
    m = copy.deepcopy(toy_model)
    prune_model(m, plan_pruning(m, st, PruneConfig(criterion=criterion, keep=1.0)), PruneConfig(keep=1.0))
    assert torch.equal(m(windows.ids_NL).logits, before)


def test_pruned_model_equals_removing_the_rows_by_hand(toy_model, windows):
    """Oracle: the pruned layer's output equals a loop over the original experts restricted to the kept ones."""
    st = _stats(toy_model, windows)
    cfg = PruneConfig(criterion="reap", keep=0.5)
    plan = plan_pruning(toy_model, st, cfg)
    old = copy.deepcopy(get_site(toy_model, 0).layer)
    prune_model(toy_model, plan, cfg)
    new = get_site(toy_model, 0).layer
    x = torch.randn(10, 32)
    keep = plan[0]
    logits = x @ old.router.gate.weight_ED[keep].T
    p = torch.softmax(logits, -1)
    w, i = torch.topk(p, 2)
    w = w / w.sum(-1, keepdim=True)
    from moelab.layers.experts import expert_forward

    ref = torch.stack([sum(w[t, j] * expert_forward(old.experts, x[t:t + 1], keep[int(i[t, j])])[0] for j in range(2))
                       for t in range(10)])
    torch.testing.assert_close(new(x), ref, rtol=1e-5, atol=1e-6)


def test_per_layer_and_global_budgets(toy_model, windows):
    st = _stats(toy_model, windows)
    per = plan_pruning(toy_model, st, PruneConfig(criterion="frequency", keep=0.25))
    assert [len(v) for v in per.values()] == [2, 2]
    assert per[0] == top_experts(st[0].count_E, 2)
    glob = plan_pruning(toy_model, st, PruneConfig(criterion="frequency", keep=0.5, scope="global"))
    assert sum(len(v) for v in glob.values()) == 8 and all(len(v) >= 2 for v in glob.values())


def test_global_budget_follows_normalised_scores():
    from moelab.ops.prune.base import _global_plan

    scores = {0: np.array([10.0, 0.0, 0.0, 0.0]), 1: np.array([1.0, 1.0, 1.0, 1.0])}
    # layer 0 keeps its floor (1) and nothing else scores; layer 1 gets the remaining 3 slots
    assert _global_plan(scores, {0: 2, 1: 2}, {0: 1, 1: 1}) == {0: [0], 1: [0, 1, 2]}


def test_group_aware_keeps_equal_groups():
    assert top_experts(np.array([9, 8, 7, 6, 1, 2, 3, 4.0]), 4, n_groups=2) == [0, 1, 6, 7]
    with pytest.raises(MoelabError, match="n_groups=2"):
        top_experts(np.arange(8.0), 3, n_groups=2)


def test_group_limited_router_prunes_per_group(windows):
    torch.manual_seed(0)
    layer = MoELayer(moe_cfg(router="sigmoid_topk", router_kwargs={"n_groups": 2, "topk_groups": 1}))
    model = Stack([layer]).eval()
    st = _stats(model, windows)
    plan = plan_pruning(model, st, PruneConfig(criterion="soft_count", keep=0.5))
    assert sum(e < 4 for e in plan[0]) == 2 and sum(e >= 4 for e in plan[0]) == 2
    prune_model(model, plan, PruneConfig(keep=0.5))
    assert model(windows.ids_NL).logits.isfinite().all()


def test_super_experts_guard():
    a = LayerStats(index=0, num_experts=4, k=1)
    b = LayerStats(index=1, num_experts=4, k=1)
    a.max_act_E, b.max_act_E = np.array([1.0, 1.2, 0.9, 1.1]), np.array([1.0, 50.0, 1.1, 0.8])
    assert super_experts({0: a, 1: b}) == {1: {1}}
    for st in (a, b):
        st.count_E = np.array([5.0, 0.0, 4.0, 3.0])
    model = Stack([MoELayer(moe_cfg(num_experts=4, k=1)), MoELayer(moe_cfg(num_experts=4, k=1))])
    plain = plan_pruning(model, {0: a, 1: b}, PruneConfig(criterion="frequency", keep=2))
    guarded = plan_pruning(model, {0: a, 1: b}, PruneConfig(criterion="frequency", keep=2, guard_super_experts=True))
    assert plain[1] == [0, 2] and guarded[1] == [0, 1] and guarded[0] == plain[0]


@pytest.mark.parametrize("keep, match", [(0.0, "keep=0.0"), (1.5, "keep=1.5"), (-1, "keep=-1"), (9, "out of range"),
                                         ("half", "keep='half'")])
def test_bad_keep(toy_model, windows, keep, match):
    st = _stats(toy_model, windows)
    with pytest.raises(MoelabError, match=match):
        plan_pruning(toy_model, st, PruneConfig(criterion="frequency", keep=keep))


def test_unknown_criterion_lists_the_choices(toy_model, windows):
    with pytest.raises(MoelabError, match="choose one of: 'ean', 'easy_ep', 'frequency'"):
        plan_pruning(toy_model, {}, PruneConfig(criterion="magnitude"))


def test_k_exceeding_the_experts_left(toy_model, windows):
    st = _stats(toy_model, windows)
    plan = plan_pruning(toy_model, st, PruneConfig(criterion="frequency", keep=1))
    with pytest.raises(MoelabError, match="fewer than its k=2"):
        prune_model(copy.deepcopy(toy_model), plan, PruneConfig(keep=1))
    m = copy.deepcopy(toy_model)
    prune_model(m, plan, PruneConfig(keep=1, cap_k=True))
    assert [s.layer.cfg.k for s in moe_layers(m)] == [1, 1]


def test_renormalize_option_sets_the_router(toy_model, windows):
    st = _stats(toy_model, windows)
    m = copy.deepcopy(toy_model)
    cfg = PruneConfig(criterion="reap", keep=0.5, renormalize=False)
    prune_model(m, plan_pruning(m, st, cfg), cfg)
    assert all(s.layer.router.renormalize is False for s in moe_layers(m))


# --------------------------------------------------------------------------- a pruned run
def test_pruned_run_saves_loads_evaluates_and_resumes(micro_run, tmp_path):
    from moelab.ops.runner import run_op
    from moelab.train.config import RunConfig
    from moelab.train.run import load_run
    from moelab.train.trainer import train

    out = tmp_path / "pruned"
    man = run_op(micro_run, out, "prune", "reap", 0.5, CalibrationConfig(tokens=256, progress=False))
    assert json.loads((out / "ops_manifest.json").read_text())["criterion"] == "reap"
    loaded = load_run(out)
    assert [s.layer.cfg.num_experts for s in moe_layers(loaded.model)] == [4, 4]
    cfg = RunConfig.load(out / "config.json")
    assert cfg.model.layer_overrides == {"0": {"num_experts": 4}, "1": {"num_experts": 4}}
    assert man["after"]["total"] < man["before"]["total"]
    src = load_run(micro_run)
    x = torch.randint(0, 200, (2, 8))
    assert not torch.equal(src.model(x).logits, loaded.model(x).logits)
    cfg.train.steps = 9
    summary = train(cfg, out, resume=True, progress="off")
    assert summary["step"] == 9 and np.isfinite(summary["val_loss"])
    assert load_run(out).step == 9


def test_interrupted_operation_leaves_source_and_target_untouched(micro_run, tmp_path, monkeypatch):
    from moelab.ops.runner import run_op
    from moelab.train import checkpoint as ckpt

    def snapshot():
        return {p.relative_to(micro_run): p.read_bytes() for p in sorted(micro_run.rglob("*")) if p.is_file()}

    before = snapshot()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_checkpoint", boom)
    with pytest.raises(KeyboardInterrupt):
        run_op(micro_run, tmp_path / "out", "prune", "frequency", 0.5, CalibrationConfig(tokens=256, progress=False))
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    assert snapshot() == before
