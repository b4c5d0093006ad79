"""RouterBench-schema loader defects (issue 20 §1): folders and several files, list-literal
prompts, duplicated sample_id rows, missing cost columns named."""

import csv
import json

import numpy as np
import pytest

from moelab.cli.main import main
from moelab.errors import MoelabError
from moelab.route import data as D

MODELS = ["gpt-4", "mistral-7b", "yi-34b"]


def _rows(n, start=0, split="train"):
    rows = []
    for i in range(start, start + n):
        r = {"sample_id": f"arc.{split}.{i}", "prompt": str([f"Question {i}: pick one."]),
             "eval_name": "arc-challenge", "oracle_model_to_route_to": "mistral-7b"}
        for j, m in enumerate(MODELS):
            r[m] = float((i + j) % 2)
            r[f"{m}|total_cost"] = 1e-4 * (j + 1) * (1 + i % 3)
            r[f"{m}|model_response"] = f"ans {i}"
        rows.append(r)
    return rows


def _csv(path, rows, drop=()):
    cols = [c for c in rows[0] if c not in drop]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def test_folder_and_several_files_are_concatenated(tmp_path):
    a, b = _rows(5, 0, "train"), _rows(4, 100, "test")
    _csv(tmp_path / "arc_train.csv", a)
    _csv(tmp_path / "arc_test.csv", b)
    ds = D.load_dataset(str(tmp_path))
    assert ds.n_prompts == 9 and ds.models == MODELS
    ds2 = D.load_dataset(f"{tmp_path / 'arc_train.csv'},{tmp_path / 'arc_test.csv'}")
    assert sorted(ds2.prompt_ids) == sorted(ds.prompt_ids)
    r = b[2]
    i = ds.prompt_ids.index(r["sample_id"])
    assert ds.costs_PM[i].tolist() == pytest.approx([r[f"{m}|total_cost"] for m in MODELS])


def test_jsonl_routerbench_file(tmp_path):
    rows = _rows(4)
    p = tmp_path / "rb.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    ds = D.load_dataset(str(p))
    assert ds.scores_PM.tolist() == [[r[m] for m in MODELS] for r in rows]


def test_list_literal_prompts_are_unwrapped(tmp_path):
    ds = D.load_dataset(str(_csv(tmp_path / "rb.csv", _rows(3))))
    assert ds.texts[0] == "Question 0: pick one."
    assert D.unwrap_prompt("['turn one', 'turn two']") == "turn one\n\nturn two"
    assert D.unwrap_prompt("[not a literal") == "[not a literal"
    assert D.unwrap_prompt("[1, 2]") == "[1, 2]"  # a list of numbers is a prompt, not turns


def test_duplicated_sample_id_rows_are_merged(tmp_path):
    rows = _rows(3)
    first, second = dict(rows[1]), dict(rows[1])
    first[MODELS[2]] = ""  # RouterBench splits the scores of one prompt over two rows,
    second[MODELS[0]] = second[MODELS[1]] = ""  # each row with its own costs
    for m in MODELS:
        second[f"{m}|total_cost"] = 7.0 * first[f"{m}|total_cost"]
    ds = D.load_dataset(str(_csv(tmp_path / "rb.csv", [rows[0], first, second, rows[2]])))
    assert ds.n_prompts == 3
    i = ds.prompt_ids.index(rows[1]["sample_id"])
    assert ds.scores_PM[i].tolist() == [rows[1][m] for m in MODELS]
    # each model's cost comes from the row that holds its score
    exp = [first[f"{MODELS[0]}|total_cost"], first[f"{MODELS[1]}|total_cost"], second[f"{MODELS[2]}|total_cost"]]
    assert ds.costs_PM[i].tolist() == pytest.approx(exp)


def test_conflicting_duplicates_and_blank_scores_name_the_row(tmp_path):
    rows = _rows(3)
    clash = dict(rows[1])
    clash[MODELS[0]] = 1.0 - rows[1][MODELS[0]]
    with pytest.raises(MoelabError, match=r"sample_id='arc.train.1' appears on rows \[1, 3\].*values of 'gpt-4'"):
        D.load_dataset(str(_csv(tmp_path / "a.csv", rows + [clash])))
    rows[2][MODELS[1]] = ""
    with pytest.raises(MoelabError, match=r"score of mistral-7b='' on sample_id='arc.train.2'"):
        D.load_dataset(str(_csv(tmp_path / "b.csv", rows)))


def test_missing_cost_column_names_the_model(tmp_path, capsys):
    rows = _rows(4)
    p = _csv(tmp_path / "rb.csv", rows, drop=["gpt-4|total_cost"])
    with pytest.raises(MoelabError, match=r"model 'gpt-4' has no cost column 'gpt-4\|total_cost'"):
        D.load_dataset(str(p))
    assert main(["route", "compare", "--data", str(p), "--routers", "knn", "--no-cache"]) == 2
    assert "'gpt-4|total_cost'" in capsys.readouterr().err
    every = _csv(tmp_path / "nocost.csv", rows, drop=[f"{m}|total_cost" for m in MODELS])
    with pytest.raises(MoelabError, match=r"no cost column"):
        D.load_dataset(str(every))


def test_files_with_other_models_are_refused(tmp_path):
    _csv(tmp_path / "a.csv", _rows(3))
    _csv(tmp_path / "b.csv", _rows(3, 10), drop=[c for c in _rows(1)[0] if c.startswith("yi-34b")])
    with pytest.raises(MoelabError, match="differ from"):
        D.load_dataset(str(tmp_path))
    assert np.isfinite(1.0)


def test_wide_file_without_any_cost_column_names_both_schemas(tmp_path):
    rows = [{k: v for k, v in r.items() if "|" not in k} for r in _rows(3)]
    with pytest.raises(MoelabError, match=r"RouterBench schema needs '<model>\|total_cost'.*found columns"):
        D.load_dataset(str(_csv(tmp_path / "wide.csv", rows)))
