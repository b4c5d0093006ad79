"""Issue 20 §1 defects, each with a test: late compare failures, options for absent routers, the
chart label, CV tuning recorded, both metric conventions, bandit collapse, oracle fit, reprs."""

import json

import numpy as np
import pytest

from moelab.cli.main import main
from moelab.errors import MoelabError
from moelab.route import build_router, metrics as mt
from moelab.route.data import RoutingDataset
from moelab.route.evaluate import compare, evaluate_sweep, format_table, series_styles, sweep, validate_plan
from moelab.route.synthetic import topic_dataset


def _write(tmp_path, n_models=3, n=240):
    ds = topic_dataset(n=n, n_models=n_models, n_topics=min(n_models, 3), seed=7)
    rows = [{"prompt_id": p, "model": m, "score": float(ds.scores_PM[i, j]), "cost": float(ds.costs_PM[i, j]),
             "prompt": ds.texts[i], "category": ds.categories[i]}
            for i, p in enumerate(ds.prompt_ids) for j, m in enumerate(ds.models)]
    path = tmp_path / "logs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_compare_validates_the_whole_plan_before_fitting(tmp_path, capsys, monkeypatch):
    fitted = []
    from moelab.route import base

    orig = base.ModelRouter.fit
    monkeypatch.setattr(base.ModelRouter, "fit", lambda self, *a, **k: (fitted.append(self.name), orig(self, *a, **k))[1])
    data = _write(tmp_path)
    rc = main(["route", "compare", "--data", str(data), "--routers", "knn,linear,cascade", "--no-cache"])
    err = capsys.readouterr().err
    assert rc == 2 and "--models A,B" in err and "select_models" not in err
    assert fitted == []  # nothing was fitted before the error


def test_option_for_a_router_not_in_the_plan_is_an_error(tmp_path, capsys):
    data = _write(tmp_path)
    rc = main(["route", "compare", "--data", str(data), "--routers", "knn", "--option", "mf.epochs=3", "--no-cache"])
    assert rc == 2 and "not in --routers" in capsys.readouterr().err
    with pytest.raises(MoelabError, match="unknown option"):
        validate_plan(topic_dataset(n=30), ["knn"], {"knn": {"kk": 3}})


def test_fit_oracle_is_refused_up_front(tmp_path, capsys):
    data = _write(tmp_path)
    assert main(["route", "fit", "oracle", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "cannot route new prompts" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_help_texts_for_routers_seed_test_frac(capsys):
    with pytest.raises(SystemExit):
        main(["route", "compare", "--help"])
    out = capsys.readouterr().out
    for flag in ("--routers", "--seed", "--test-frac"):
        line = out[out.index(flag):].split("\n--")[0]
        assert len(line.split()) > 3, flag


def test_error_messages_print_plain_numbers():
    with pytest.raises(MoelabError) as e:
        RoutingDataset("t", ["p"], ["x"], ["s"], ["c"], ["a"], np.array([[np.nan]]), np.ones((1, 1)))
    assert "np.float64" not in str(e.value) and "nan" in str(e.value)


def test_group_by_with_few_groups_warns(tmp_path):
    logs = []
    ds = topic_dataset(n=150, n_models=2, n_topics=3, seed=1)
    res = compare(ds, ["knn"], group_by="category", n_boot=0, feature_dim=8, log=logs.append, tune=False)
    assert any("leave-" in s and "warning" in s for s in logs)
    assert res["split"]["test_groups"] and not set(res["split"]["test_groups"]) & set(res["split"]["train_groups"])


def test_cv_tuning_by_default_is_recorded_and_helps(tmp_path):
    ds = topic_dataset(n=600, n_models=3, seed=4)
    res = compare(ds, ["knn"], n_boot=0, feature_dim=16, log=lambda s: None)
    t = res["routers"]["knn"]["tuning"]
    assert set(t["cv_aiq"]) == {f"k={k}" for k in (5, 10, 20, 50, 100, 200)}
    best = max(t["cv_aiq"], key=t["cv_aiq"].get)
    assert best == f"k={t['chosen']['k']}" and res["routers"]["knn"]["options"]["k"] == t["chosen"]["k"]
    assert "k=" in format_table(res)
    fixed = compare(ds, ["knn"], n_boot=0, feature_dim=16, log=lambda s: None, router_options={"knn": {"k": 7}})
    assert fixed["routers"]["knn"]["options"]["k"] == 7 and fixed["routers"]["knn"]["tuning"]["chosen"] == {}


def test_apgr_conventions_against_hand_values():
    # swept points reach 0%..60% strong calls only; weak 0.5, strong 1.0
    frac, q = np.array([0.0, 0.3, 0.6]), np.array([0.5, 0.8, 0.9])
    # RouteLLM: trapz over [0, 0.6] = 0.3*(0.65) + 0.3*(0.85) = 0.45; weak area 0.3, strong 0.6
    assert mt.apgr_routellm(frac, q, 0.5, 1.0) == pytest.approx((0.45 - 0.3) / (0.6 - 0.3))
    # moelab: flat extension to 1: area 0.45 + 0.4 * 0.9 = 0.81 -> (0.81 - 0.5) / 0.5
    assert mt.apgr(frac, q, 0.5, 1.0) == pytest.approx(0.62)
    full = np.array([0.0, 0.5, 1.0])
    assert mt.apgr(full, [0.5, 0.9, 1.0], 0.5, 1.0) == pytest.approx(mt.apgr_routellm(full, [0.5, 0.9, 1.0], 0.5, 1.0))


def test_aiq_own_points_penalises_a_router_worse_than_mixing():
    # models: cheap (q 0.4, $1), dear (q 1.0, $3); a router with one point (q 0.5, $2) is under the chord
    n = 4
    scores = np.array([[0.4, 1.0]] * n)
    ds = RoutingDataset("t", [f"p{i}" for i in range(n)], ["x"] * n, ["s"] * n, ["c"] * n, ["cheap", "dear"],
                        scores, np.array([[1.0, 3.0]] * n))
    from moelab.route.evaluate import Sweep

    sw = Sweep("r", np.array([0.5]), np.zeros((1, n), int), np.full((1, n), 0.5), np.full((1, n), 2.0))
    m = evaluate_sweep(sw, ds, n_boot=0)["metrics"]
    assert m["aiq"] == pytest.approx(0.7) == pytest.approx(m["aiq_zero_router"])  # chord mean: (0.4 + 1) / 2
    assert m["aiq_own_points"] == pytest.approx(0.5 * (3 - 2) / (3 - 1))  # nothing below $2, 0.5 above


def test_chart_does_not_relabel_a_router_that_misses_the_budget(tmp_path):
    base = topic_dataset(n=200, n_models=2, seed=3)
    s = base.scores_PM.copy()
    s[:, 1] = 1.0  # the dearer model is the best one
    ds = RoutingDataset("t", base.prompt_ids, base.texts, base.sources, base.categories, base.models, s,
                        base.costs_PM)
    tr, te = ds.split(0.4)
    r = build_router("best-single").fit(tr)  # always the dearer model: never within 50% of the top cost
    res = evaluate_sweep(sweep(r, te), te, n_boot=0)
    assert res["per_category_at_50pct_budget"] is None and not np.isfinite(res["metrics"]["q_at_50"])
    ok = evaluate_sweep(sweep(build_router("cheapest").fit(tr), te), te, n_boot=0)
    assert ok["per_category_at_50pct_budget"] is not None


def test_series_styles_are_distinct_beyond_ten():
    st = series_styles(25)
    assert len({(s["color"], s["ls"], s["marker"]) for s in st}) == 25
    assert len({s["color"] for s in st[:20]}) == 20


def test_report_with_a_router_missing_the_budget(tmp_path):
    from moelab.route.evaluate import write_report

    ds = topic_dataset(n=200, n_models=2, seed=3)
    res = compare(ds, ["best-single", "knn"], n_boot=0, feature_dim=8, log=lambda s: None, tune=False)
    paths = write_report(res, tmp_path)
    assert paths["html"].read_text().count("data:image/png;base64,") == 2


def test_bandit_does_not_collapse_on_eleven_models():
    ds = topic_dataset(n=600, n_models=11, n_topics=6, seed=0)
    tr, te = ds.split(0.33)
    r = build_router("bandit", rounds_per_model=700).fit(tr)
    assert r.n_epochs(tr.n_prompts) > 4
    idx = r.route(te, tradeoff=0.0)
    q = te.scores_PM[np.arange(te.n_prompts), idx].mean()
    assert len(set(idx.tolist())) >= 3
    assert q > te.scores_PM.mean(0).max() + 0.1, (q, te.scores_PM.mean(0).max())


def test_budget_error_prints_a_plain_number():
    ds = topic_dataset(n=60, n_models=2, seed=1)
    r = build_router("cheapest").fit(ds)
    with pytest.raises(MoelabError) as e:
        r.route(ds, budget=np.float64(1e-12))
    assert "np.float64" not in str(e.value) and "budget=1e-12" in str(e.value)
