"""The ``moelab route`` commands on a small long-format file written by the test."""

import json

import numpy as np

from moelab.cli.main import main
from moelab.route.synthetic import topic_dataset


def _write(tmp_path):
    ds = topic_dataset(n=240, n_models=2, n_topics=2, seed=7)
    rows = [{"prompt_id": p, "model": m, "score": float(ds.scores_PM[i, j]), "cost": float(ds.costs_PM[i, j]),
             "prompt": ds.texts[i], "category": ds.categories[i]}
            for i, p in enumerate(ds.prompt_ids) for j, m in enumerate(ds.models)]
    path = tmp_path / "logs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_routers_lists_registry(capsys):
    assert main(["route", "routers", "--json"]) == 0
    names = {r["name"] for r in json.loads(capsys.readouterr().out)}
    assert {"knn", "mf", "carrot", "threshold", "oracle"} <= names


def test_compare_fit_predict(tmp_path, capsys):
    data = _write(tmp_path)
    out = tmp_path / "report"
    rc = main(["route", "compare", "--data", str(data), "--routers", "random,knn,carrot,threshold",
               "--out", str(out), "--bootstrap", "20", "--feature-dim", "16", "--no-cache"])
    assert rc == 0
    txt = capsys.readouterr().out
    assert "| knn |" in txt and "AIQ" in txt
    res = json.loads((out / "results.json").read_text())
    assert set(res["routers"]) == {"random", "knn", "carrot", "threshold"}
    assert res["routers"]["carrot"]["metrics"]["aiq"] > res["routers"]["random"]["metrics"]["aiq"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2
    rdir = tmp_path / "carrot"
    assert main(["route", "fit", "carrot", "--data", str(data), "--out", str(rdir), "--feature-dim", "16",
                 "--no-cache"]) == 0
    capsys.readouterr()
    assert main(["route", "predict", str(rdir), "--prompt", "algebra algebra question", "--tradeoff", "0"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert got["model"] in ("model0", "model1")


def test_bad_router_name_is_a_clear_error(tmp_path, capsys):
    data = _write(tmp_path)
    assert main(["route", "compare", "--data", str(data), "--routers", "knn,nope", "--no-cache"]) == 2
    assert "unknown model router 'nope'" in capsys.readouterr().err


def test_budget_below_cheapest_is_a_clear_error(tmp_path, capsys):
    data = _write(tmp_path)
    rdir = tmp_path / "knn"
    assert main(["route", "fit", "knn", "--data", str(data), "--out", str(rdir), "--feature-dim", "16",
                 "--no-cache"]) == 0
    assert main(["route", "predict", str(rdir), "--prompt", "poetry", "--budget", "1e-9"]) == 2
    assert "budget=1e-09" in capsys.readouterr().err
    assert np.isfinite(1.0)


def test_predict_prints_the_choice_with_its_estimated_quality_and_cost(tmp_path, capsys):
    """A budget and a trade-off may pick different models: each line says what the router expects of
    its choice, and --all-models shows every model's estimate (the oracle: the router's estimate())."""
    from moelab.route.base import load_router

    data = _write(tmp_path)
    rdir = tmp_path / "knn"
    assert main(["route", "fit", "knn", "--data", str(data), "--out", str(rdir), "--feature-dim", "16",
                 "--no-cache", "--no-tune"]) == 0
    capsys.readouterr()
    prompts = ["algebra algebra question", "poetry poetry verse"]
    args = ["route", "predict", str(rdir), "--prompt", prompts[0], "--prompt", prompts[1], "--all-models"]
    assert main([*args, "--tradeoff", "0"]) == 0
    cap = capsys.readouterr()
    lines = [json.loads(x) for x in cap.out.strip().splitlines()]
    q_PM, c_PM = load_router(rdir).estimate(prompts)
    for p, got in enumerate(lines):
        j = ["model0", "model1"].index(got["model"])
        assert got["est_quality"] == round(float(q_PM[p, j]), 4)
        assert got["est_cost_usd"] == float(f"{c_PM[p, j]:.4g}")
        assert got["est_quality"] == max(v["quality"] for v in got["estimates"].values())  # quality only
    assert "knn at tradeoff 0: " in cap.err and "estimated mean quality" in cap.err
    assert main([*args[:-1], "--tradeoff", "1"]) == 0
    cheap = capsys.readouterr()
    assert all(json.loads(x)["model"] == "model0" for x in cheap.out.strip().splitlines())  # the cheaper model
    assert "estimates" not in cheap.out
    assert main([*args[:-1], "--budget", "1.5e-3"]) == 0
    assert "knn at budget $0.0015 per prompt" in capsys.readouterr().err
