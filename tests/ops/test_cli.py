"""CLI: help texts, the bad-input table, and end to end: prune / merge / skip -> eval, generate, analyze;
compress-compare's table and report."""

from __future__ import annotations

import json

import pytest

from moelab.cli.main import main

CAL = ["--calib-tokens", "256", "--no-progress"]


@pytest.mark.parametrize("verb, needle", [("prune", "reap"), ("merge", "hc_smoe"), ("skip", "modes"),
                                          ("compress-compare", "--methods")])
def test_help(verb, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0 and needle in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["prune", "{run}", "--keep", "0", "--out", "{out}"], "keep=0 is not valid"),
    (["prune", "{run}", "--keep", "1.5", "--out", "{out}"], "keep=1.5"),
    (["prune", "{run}", "--keep", "12", "--out", "{out}"], "keep=12 is out of range"),
    (["prune", "{run}", "--keep", "lots", "--out", "{out}"], "--keep='lots' is not valid"),
    (["prune", "{run}", "--method", "magic", "--out", "{out}"], "method='magic' is not a prune method; choose one of: ean"),
    (["merge", "{run}", "--method", "reap", "--out", "{out}"], "is not a merge method; choose one of: dern, hc_smoe"),
    (["prune", "{run}", "--keep", "1", "--out", "{out}"], "fewer than its k=2"),
    (["prune", "{run}", "--out", "{out}", "--calib-tokens", "100000000"], "choose fewer calibration tokens"),
    (["prune", "{run}", "--out", "{run}", "--overwrite"], "is the source run"),
    (["merge", "{run}", "--out", "{out}", "--options", "{{bad"], "--options"),
    (["skip", "{run}", "--rate", "1.2", "--out", "{out}"], "rate=1.2"),
    (["compress-compare", "{run}", "--methods", "nope", "--out", "{out}"], "method='nope' is not valid"),
    (["compress-compare", "{run}", "--keep", "2", "--out", "{out}"], "keep=2.0"),
    (["prune", "{missing}", "--out", "{out}"], "is not a run directory"),
    (["prune", "{run}", "--out", "{out}", "--calib-domain", "gamma"], "calibration.domain='gamma' is not valid"),
])
def test_bad_input_table(micro_run, tmp_path, capsys, argv, message):
    fill = {"run": str(micro_run), "out": str(tmp_path / "out"), "missing": str(tmp_path / "nope")}
    argv = [a.format(**fill) for a in argv]
    code = main(argv[:1] + CAL + argv[1:])  # the case's own options come last and win
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or argv[0] == "compress-compare"


def test_existing_output_needs_overwrite(micro_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("keep me")
    assert main(["prune", str(micro_run), "--out", str(out)] + CAL) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "x").read_text() == "keep me"


@pytest.mark.parametrize("argv", [
    ["prune", "--method", "easy-ep", "--keep", "0.5", "--guard-super-experts", "--calib-domain", "alpha"],
    ["prune", "--method", "tcess", "--keep", "4", "--task", "beta", "--scope", "global"],
    ["merge", "--method", "hc-smoe", "--keep", "0.5"],
    ["merge", "--method", "sub-moe", "--keep", "0.5", "--options", '{"rank": 4}'],
    ["skip", "--method", "modes", "--rate", "0.3"],
])
def test_operated_run_works_with_eval_and_generate(micro_run, tmp_path, capsys, argv):
    out = tmp_path / "out"
    assert main([argv[0], str(micro_run), "--out", str(out)] + argv[1:] + CAL) == 0
    manifest = json.loads((out / "ops_manifest.json").read_text())
    assert manifest["op"] == argv[0] and manifest["calibration"]["tokens_used"] >= 256
    if "--calib-domain" in argv:
        assert manifest["calibration"]["domains"] == ["alpha"]
    capsys.readouterr()
    assert main(["eval", str(out), "--max-batches", "1", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["val_ppl"] > 1
    assert main(["generate", str(out), "--prompt", "ab cd", "--max-new-tokens", "4"]) == 0


def test_compress_compare_writes_table_and_report(micro_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compress-compare", str(micro_run), "--methods", "frequency,reap,hc-smoe,modes",
                 "--keep", "0.5,0.25", "--eval-batches", "1", "--out", str(out)] + CAL)
    assert code == 0
    md = (out / "compare.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]
    assert len(rows) == 1 + 4 * 2 and rows[0].startswith("| none | baseline")
    res = json.loads((out / "compare.json").read_text())
    ok = [r for r in res["rows"] if "error" not in r]
    assert all(r["val_ppl"] > 1 for r in ok)
    pruned = [r for r in ok if r["method"] == "reap"]
    assert all(r["total"] < res["rows"][0]["total"] for r in pruned)
    skipped = [r for r in ok if r["method"] == "modes"]
    assert all(r["active"] < res["rows"][0]["active"] and r["total"] == res["rows"][0]["total"] for r in skipped)
    html = (out / "compare.html").read_text()
    assert "data:image/png;base64," in html and "<table" in html


def test_analyze_and_report_work_on_a_merged_run(micro_run, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", str(micro_run), "--method", "m-smoe", "--out", str(out)] + CAL) == 0
    assert main(["analyze", str(out), "--max-traces", "1"]) == 0
    assert (out / "analysis" / "analysis.json").is_file()


def test_recovery_fine_tuning_of_a_pruned_run_through_train_resume(micro_run, tmp_path):
    out = tmp_path / "pruned"
    assert main(["prune", str(micro_run), "--method", "reap", "--keep", "0.5", "--out", str(out)] + CAL) == 0
    assert main(["train", "--run-dir", str(out), "--resume", "--train.steps", "8", "--progress", "off"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 8 and summary["params_total"] < 66304
