"""Loaders (shared RouteLLM/RouterArena files, RouterBench schema, long format) and validation."""

import ast
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from moelab.errors import MoelabError
from moelab.route import data as D
from moelab.route.data import RoutingDataset


def _shared():
    env = os.environ.get("MOELAB_SHARED")
    for c in ([Path(env)] if env else []) + [Path(__file__).resolve().parents[2].parent / "shared"]:
        if (c / "data/llm-routing").is_dir():
            return c / "data/llm-routing"
    pytest.skip("shared routing data not found (set MOELAB_SHARED)")


def test_routellm_mmlu_subset_matches_csv():
    root = _shared() / "routellm/mmlu"
    ds = D.load_routellm_mmlu(root, subjects=["anatomy", "virology"])
    with open(root / "mmlu_anatomy.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert ds.models == ["mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"]
    assert set(ds.categories) == {"anatomy", "virology"}
    ana = [i for i, c in enumerate(ds.categories) if c == "anatomy"]
    assert 0 <= len({r["prompt"] for r in rows}) - len(ana) <= 5  # dedup + contaminated prompts
    exp = np.mean([r["gpt-4-1106-preview"] == "True" for r in rows])
    assert ds.scores_PM[ana, 1].mean() == pytest.approx(exp, abs=0.01)
    # cost = ceil(len/4) input tokens at $10/M + 1 output token at $30/M for GPT-4
    t = ds.texts[0]
    assert ds.costs_PM[0, 1] == pytest.approx((np.ceil(len(t) / 4) * 10 + 30) / 1e6)


def test_routellm_gsm8k_costs_from_responses_and_contamination_removed():
    root = _shared() / "routellm/gsm8k"
    ds = D.load_routellm_gsm8k(root)
    raw = D.load_routellm_gsm8k(root, drop_contaminated=False)
    n_cont = sum(1 for line in open(root / "contaminated_prompts.jsonl") if line.strip())
    assert raw.n_prompts - ds.n_prompts == ds.meta["removed_contaminated"] > 0
    assert ds.meta["removed_contaminated"] <= n_cont
    m = "gpt-4-1106-preview"
    j = ds.model_index(m)
    exp = (np.ceil(len(ds.texts[3]) / 4) * 10 + np.ceil(len(ds.responses[m][3]) / 4) * 30) / 1e6
    assert ds.costs_PM[3, j] == pytest.approx(exp)
    assert 0.8 < ds.scores_PM[:, j].mean() < 0.9


def test_routerarena_prices_and_scores():
    root = _shared() / "routerarena"
    ds = D.load_routerarena(root)
    assert ds.n_prompts == 809 and len(ds.models) == 2
    prices = json.loads((root / "cost.json").read_text())
    row = json.loads(open(root / f"{ds.models[0]}.jsonl").readline())
    p = prices[ds.models[0]]
    tu = row["token_usage"] if isinstance(row["token_usage"], dict) else ast.literal_eval(row["token_usage"])
    exp = (tu["input_tokens"] * p["input_token_price_per_million"]
           + tu["output_tokens"] * p["output_token_price_per_million"]) / 1e6
    i = ds.prompt_ids.index(row["global_index"])
    assert ds.costs_PM[i, 0] == pytest.approx(exp)
    assert ds.sources[i] == row["global_index"].split("_")[0]
    acc = dict(zip(ds.models, ds.scores_PM.mean(0)))
    assert acc["gemini-2.0-flash-001"] == pytest.approx(0.690, abs=0.005)


def test_routerarena_missing_price_is_an_error():
    with pytest.raises(MoelabError, match="missing from the price table"):
        D.load_routerarena(_shared() / "routerarena", prices={"gpt-4o": (1, 1)})


def _write_routerbench(path: Path):
    models = ["gpt-4", "mistral-7b"]
    rows = []
    for i in range(6):
        r = {"sample_id": f"q{i}", "prompt": f"question number {i}", "eval_name": "mmlu-x" if i < 3 else "gsm8k",
             "oracle_model_to_route_to": "mistral-7b"}
        for j, m in enumerate(models):
            r[m] = (i + j) % 2
            r[f"{m}|total_cost"] = 1e-3 * (j + 1) * (i + 1)
            r[f"{m}|model_response"] = f"answer {i} {m}"
        rows.append(r)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def test_routerbench_csv_and_pickle(tmp_path):
    rows = _write_routerbench(tmp_path / "rb.csv")
    ds = D.load_dataset(str(tmp_path / "rb.csv"))
    assert ds.models == ["gpt-4", "mistral-7b"]
    for i, r in enumerate(rows):
        assert ds.scores_PM[i].tolist() == [r["gpt-4"], r["mistral-7b"]]
        assert ds.costs_PM[i, 1] == pytest.approx(r["mistral-7b|total_cost"])
    assert ds.categories[0] == "mmlu-x" and ds.responses["gpt-4"][2] == "answer 2 gpt-4"
    pd = pytest.importorskip("pandas")
    pd.DataFrame(rows).to_pickle(tmp_path / "rb.pkl")
    with pytest.raises(MoelabError, match="--allow-pickle"):
        D.load_dataset(str(tmp_path / "rb.pkl"))
    with pytest.warns(UserWarning, match="runs any code"):
        ds2 = D.load_dataset(str(tmp_path / "rb.pkl"), allow_pickle=True)
    np.testing.assert_allclose(ds2.costs_PM, ds.costs_PM)


def _long_rows():
    return [{"prompt_id": f"p{i}", "model": m, "score": (i * (j + 1)) % 3 / 2, "cost": 0.01 * (j + 1),
             "prompt": f"text {i}", "category": "c" + str(i % 2)}
            for i in range(5) for j, m in enumerate(["a", "b"])]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_long_format(tmp_path, fmt):
    rows = _long_rows()
    p = tmp_path / f"logs.{fmt}"
    if fmt == "csv":
        with open(p, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif fmt == "jsonl":
        p.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        pd = pytest.importorskip("pandas")
        pytest.importorskip("pyarrow")
        pd.DataFrame(rows).to_parquet(p)
    ds = D.load_dataset(str(p))
    assert ds.models == ["a", "b"] and ds.n_prompts == 5
    for r in rows:
        i, j = ds.prompt_ids.index(r["prompt_id"]), ds.models.index(r["model"])
        assert ds.scores_PM[i, j] == pytest.approx(r["score"]) and ds.costs_PM[i, j] == pytest.approx(r["cost"])
    assert ds.categories[1] == "c1"


def test_long_format_missing_pair_is_an_error(tmp_path):
    rows = _long_rows()[:-1]
    p = tmp_path / "x.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(MoelabError, match="no row for model 'b' on prompt 'p4'"):
        D.load_long(p)


def _ds(scores, costs):
    n = len(scores)
    return RoutingDataset("t", [f"p{i}" for i in range(n)], ["x"] * n, ["s"] * n, ["c"] * n, ["a", "b"],
                          np.array(scores, float), np.array(costs, float))


@pytest.mark.parametrize("bad,msg", [(1.5, "outside \\[0, 1\\]"), (-0.1, "outside"), (np.nan, "finite")])
def test_bad_scores_are_named(bad, msg):
    with pytest.raises(MoelabError, match=msg):
        _ds([[0.5, bad]], [[1, 1]])


@pytest.mark.parametrize("bad", [np.nan, -1.0])
def test_bad_costs_are_named(bad):
    with pytest.raises(MoelabError, match="cost=.*model 'b'"):
        _ds([[0.5, 0.5]], [[1, bad]])


def test_split_deterministic_disjoint_and_grouped():
    n = 300
    ds = RoutingDataset("t", [f"p{i}" for i in range(n)], [f"text {i}" for i in range(n)], ["s"] * n,
                        [f"cat{i % 10}" for i in range(n)], ["a", "b"], np.zeros((n, 2)), np.ones((n, 2)))
    tr, te = ds.split(0.3)
    tr2, te2 = ds.split(0.3)
    assert tr.prompt_ids == tr2.prompt_ids and not set(tr.prompt_ids) & set(te.prompt_ids)
    assert tr.n_prompts + te.n_prompts == n and 0.2 < te.n_prompts / n < 0.4
    trg, teg = ds.split(0.3, group_by="category")
    assert not set(trg.categories) & set(teg.categories)
    tr3, va3, te3 = ds.split(0.2, val_frac=0.2)
    assert tr3.n_prompts + va3.n_prompts + te3.n_prompts == n


def test_dedup_and_contamination():
    ds = RoutingDataset("t", ["a", "b", "c"], ["Hello  world", "hello world", "other"], ["s"] * 3, ["c"] * 3,
                        ["m"], np.zeros((3, 1)), np.ones((3, 1)))
    assert ds.deduplicate().prompt_ids == ["a", "c"]
    assert ds.remove_prompts(["OTHER"]).prompt_ids == ["a", "b"]


def test_unknown_dataset_name():
    with pytest.raises(MoelabError, match="neither a dataset name"):
        D.load_dataset("no-such-dataset")
