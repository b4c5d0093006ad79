"""Planning: every run's config and the fairness of the sweep are checked before anything trains."""

import pytest

from moelab.errors import MoelabError
from moelab.sweep.runner import plan_sweep
from moelab.sweep.spec import SweepSpec


def spec_of(base, **kw):
    return SweepSpec.from_dict({"name": "t", "seeds": [0], "base": base, **kw})


def test_plan_states_every_run_with_its_parameters(micro, tmp_path):
    spec = spec_of(micro(), axes={"moe.router": ["softmax_topk", "sigmoid_topk"]}, seeds=[0, 1])
    plan = plan_sweep(spec, tmp_path / "sw")
    assert [r.name for r in plan.runs] == ["router=softmax_topk__seed0", "router=softmax_topk__seed1",
                                           "router=sigmoid_topk__seed0", "router=sigmoid_topk__seed1"]
    assert all(r.state == "new" and r.params_active < r.params_total for r in plan.runs)
    assert [r.config.train.seed for r in plan.runs] == [0, 1, 0, 1]
    assert plan.runs[0].config.model.moe.router == "softmax_topk"
    text = plan.describe()
    assert "fair" in text and f"{plan.runs[0].params_active:,}" in text
    assert not (tmp_path / "sw").exists()  # planning writes nothing


def test_active_parameters_match_a_direct_count(micro, tmp_path):
    from moelab.models.transformer import MoETransformer

    plan = plan_sweep(spec_of(micro()), tmp_path / "sw")
    r = plan.runs[0]
    n = MoETransformer(r.config.model).num_parameters()
    assert (r.params_total, r.params_active) == (n["total"], n["active"])
    experts = sum(p.numel() for _, layer in MoETransformer(r.config.model).moe_layers() for p in layer.experts.parameters())
    assert r.params_total - r.params_active == experts - experts * 2 // 4  # k=2 of E=4 experts active


@pytest.mark.parametrize("extra,msg", [
    ({"axes": {"moe.routr": ["softmax_topk"]}}, r"key 'moe.routr'.*unknown config key"),
    ({"axes": {"moe.router": ["softmax_topk", "no_such_router"]}}, r"no_such_router.*choose one of"),
    ({"variants": [{"name": "v", "train.stepz": 3}]}, r"run 'v__seed0', key 'train.stepz'"),
    ({"axes": {"moe.k": [0]}}, r"moe.k"),
    ({"variants": [{"name": "v", "moe.router": "cosine", "moe.router_kwargs": {"bogus": 1}}]}, r"bogus"),
    ({"preset": "huge"}, r"preset='huge' is not valid"),
])
def test_bad_runs_are_refused_before_anything_starts(micro, tmp_path, extra, msg):
    spec = SweepSpec.from_dict({"name": "t", "seeds": [0], "base": micro(), **extra})
    with pytest.raises(MoelabError, match=msg):
        plan_sweep(spec, tmp_path / "sw")
    assert not (tmp_path / "sw").exists()


def test_spec_may_not_set_the_seed_itself():
    with pytest.raises(MoelabError, match="train.seed"):
        SweepSpec.from_dict({"name": "t", "axes": {"train.seed": [1, 2]}})


def test_unknown_fairness_key_and_bad_tolerance():
    with pytest.raises(MoelabError, match="unknown fairness key"):
        SweepSpec.from_dict({"name": "t", "fairness": {"tolerance": 1}})
    with pytest.raises(MoelabError, match="active_param_tolerance"):
        SweepSpec.from_dict({"name": "t", "fairness": {"active_param_tolerance": -1}})


# ------------------------------------------------------------------------------------------ fairness
def test_unequal_active_parameters_are_refused_unless_allowed(micro, tmp_path):
    spec = spec_of(micro(), axes={"moe.k": [1, 2]})  # top-1 vs top-2: different active parameters
    with pytest.raises(MoelabError, match=r"(?s)refusing to compare unfair runs.*active parameters per token differ"):
        plan_sweep(spec, tmp_path / "sw")
    plan = plan_sweep(spec, tmp_path / "sw", allow_unfair=True)
    assert not plan.fairness.fair and "UNFAIR" in plan.describe()
    a, b = (r.params_active for r in plan.runs)
    loose = spec_of(micro(), axes={"moe.k": [1, 2]}, fairness={"active_param_tolerance": b / a - 1 + 1e-9})
    assert plan_sweep(loose, tmp_path / "sw").fairness.fair
    strict = spec_of(micro(), axes={"moe.k": [1, 2]}, fairness={"active_param_tolerance": b / a - 1 - 1e-6})
    with pytest.raises(MoelabError, match="active parameters"):
        plan_sweep(strict, tmp_path / "sw")


@pytest.mark.parametrize("axes,msg", [
    ({"train.steps": [4, 8]}, "token budgets differ"),
    ({"train.batch_size": [2, 4]}, "token budgets differ"),
    ({"data.seed": [0, 1]}, r"data differs .*data.seed"),
    ({"train.eval_max_batches": [1, 2]}, "evaluation settings differ"),
])
def test_unequal_budget_data_or_eval_are_refused(micro, tmp_path, axes, msg):
    with pytest.raises(MoelabError, match=msg):
        plan_sweep(spec_of(micro(), axes=axes), tmp_path / "sw")
    assert not plan_sweep(spec_of(micro(), axes=axes, fairness={"allow_unfair": True}), tmp_path / "sw").fairness.fair


def test_seeds_alone_are_fair(micro, tmp_path):
    plan = plan_sweep(spec_of(micro(), seeds=[0, 1, 2]), tmp_path / "sw")
    assert plan.fairness.fair and len(plan.runs) == 3
