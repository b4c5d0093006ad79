"""The leaderboard on synthetic sweep directories with known answers."""

import json
import math

import numpy as np
import pytest

from moelab.errors import MoelabError
from moelab.sweep.leaderboard import build_leaderboard, write_leaderboard
from moelab.sweep.stats import compare, summarize


def fake_run(run_dir, *, val_loss, active=1000, steps=10, lr=1e-3, cv=0.2, tps=100.0, k=2, seq_len=16):
    """A finished run directory with the files the leaderboard reads."""
    run_dir.mkdir(parents=True)
    config = {"model": {"moe": {"k": k}}, "data": {"seq_len": seq_len, "seed": 0, "source": "x"},
              "train": {"steps": steps, "batch_size": 4, "grad_accum": 1, "lr": lr, "eval_max_batches": 2,
                        "eval_batch_size": None}}
    (run_dir / "config.json").write_text(json.dumps(config))
    per_domain = {"code": {"loss": val_loss + 0.1, "ppl": math.exp(val_loss + 0.1)},
                  "prose": {"loss": val_loss - 0.1, "ppl": math.exp(val_loss - 0.1)}}
    (run_dir / "summary.json").write_text(json.dumps({
        "step": steps, "steps": steps, "interrupted": False, "val_loss": val_loss, "val_ppl": math.exp(val_loss),
        "per_domain": per_domain, "params_total": 4 * active, "params_active": active}))
    layers = [{"layer": i, "load_cv": cv * (1 + i), "load_max_over_mean": 1 + cv, "dropped_frac": 0.0,
               "experts_per_token": float(k)} for i in range(2)]
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 5.0 - s / steps, "tokens_per_s": tps, "layers": layers}) + "\n"
        for s in range(1, steps + 1)))
    (run_dir / "eval.jsonl").write_text(json.dumps({"step": steps, "val_loss": val_loss}) + "\n")


def fake_sweep(root, groups, **run_kw):
    """groups: {name: [val_loss per seed]} -> a sweep directory (sweep.json + runs/)."""
    runs = []
    for g, losses in groups.items():
        for seed, loss in enumerate(losses):
            name = f"{g}__seed{seed}"
            kw = run_kw.get(g, {})
            fake_run(root / "runs" / name, val_loss=loss, **kw)
            runs.append({"name": name, "group": g, "seed": seed})
    (root / "sweep.json").write_text(json.dumps({"spec": {"name": "fake", "fairness": {}}, "runs": runs}))
    return root


A = [3.00, 3.01, 2.99]
B = [3.001, 3.011, 2.991]  # A + 0.001: equivalent within a 1-ppl margin
C = [3.50, 3.52, 3.48]  # clearly worse


def test_group_statistics_are_the_t_intervals_of_the_seeds(tmp_path):
    lb = build_leaderboard(fake_sweep(tmp_path, {"a": A, "c": C}), metric="val_loss", margin=0.05)
    assert [g.group for g in lb.groups] == ["a", "c"]  # best first
    s = lb.groups[0].stats["val_loss"]
    ref = summarize(A)
    assert (s.mean, s.ci_low, s.ci_high) == pytest.approx((ref.mean, ref.ci_low, ref.ci_high))
    ppl = lb.groups[0].stats["val_ppl"]
    assert ppl.mean == pytest.approx(np.mean(np.exp(A)))
    assert lb.groups[0].stats["code loss"].mean == pytest.approx(np.mean(A) + 0.1)
    assert lb.groups[0].stats["load_cv"].mean == pytest.approx(0.3)  # mean over layers 0.2 and 0.4
    assert lb.groups[0].stats["experts_per_token"].mean == 2.0
    assert lb.domains == ["code", "prose"]


def test_pairwise_verdicts_equivalent_and_better(tmp_path):
    lb = build_leaderboard(fake_sweep(tmp_path, {"a": A, "b": B, "c": C}), metric="val_ppl", margin=1.0,
                           all_pairs=True)
    got = {(p.a, p.b): p for p in lb.pairs}
    assert set(got) == {("a", "b"), ("a", "c"), ("b", "c")}
    ab = got[("a", "b")]
    ref = compare(np.exp(A), np.exp(B), margin=1.0)
    assert ab.comparison.diff == pytest.approx(ref.diff) and ab.comparison.equivalent
    assert ab.verdict == "a ≈ b (equivalent within ±1)"
    assert got[("a", "c")].verdict == "a is better" and got[("b", "c")].verdict == "b is better"
    # default: every configuration against the best; --baseline picks the reference
    lb2 = build_leaderboard(tmp_path, margin=1.0)
    assert [(p.a, p.b) for p in lb2.pairs] == [("b", "a"), ("c", "a")]
    lb3 = build_leaderboard(tmp_path, margin=1.0, baseline="c")
    assert [(p.a, p.b) for p in lb3.pairs] == [("a", "c"), ("b", "c")]
    with pytest.raises(MoelabError, match="baseline='z'"):
        build_leaderboard(tmp_path, baseline="z")


def test_tight_margin_is_not_equivalent(tmp_path):
    lb = build_leaderboard(fake_sweep(tmp_path, {"a": A, "b": B}), metric="val_loss", margin=0.0001)
    assert not lb.pairs[0].comparison.equivalent


def test_one_seed_gives_no_interval_and_no_pairwise_test(tmp_path):
    lb = build_leaderboard(fake_sweep(tmp_path, {"a": [3.0], "c": [3.5]}))
    assert lb.rows()[0][2] == f"{math.exp(3.0):.2f}"  # no ± with one seed
    assert lb.pairs[0].comparison is None and "2 seeds" in lb.pairs[0].verdict


def test_markdown_and_html(tmp_path):
    sweep = fake_sweep(tmp_path / "sw", {"a": A, "c": C})
    lb, md, page = write_leaderboard(sweep, metric="val_loss", margin=0.05)
    text = md.read_text()
    s = summarize(A)
    ppl = summarize(np.exp(A))
    assert f"| a | 3 | {ppl.mean:.2f} ± {ppl.half_width:.2f} | {s.mean:.3f} ± {s.half_width:.3f} |" in text
    assert "## Pairwise" in text and "a is better" in text
    doc = page.read_text()
    assert doc.count("data:image/png;base64,") == 4 and "id='leaderboard'" in doc and "id='pairs'" in doc
    for f in ("sweep_train_loss.png", "sweep_val_loss.png", "sweep_quality_vs_active.png",
              "sweep_quality_vs_balance.png"):
        assert (sweep / f).read_bytes()[:4] == b"\x89PNG"


def test_unfair_runs_are_refused_unless_allowed(tmp_path):
    sweep = fake_sweep(tmp_path, {"a": A, "c": C}, c={"active": 2000})
    with pytest.raises(MoelabError, match="(?s)refusing to compare unfair runs.*active parameters"):
        build_leaderboard(sweep)
    lb = build_leaderboard(sweep, allow_unfair=True)
    assert not lb.fairness.fair and "NOT a fair comparison" in lb.to_markdown()
    assert "NOT a fair comparison" in lb.to_html(figures=[])


def test_unequal_token_budget_is_refused(tmp_path):
    sweep = fake_sweep(tmp_path, {"a": A, "c": C}, c={"steps": 20})
    with pytest.raises(MoelabError, match="token budgets differ"):
        build_leaderboard(sweep)


def test_unfinished_runs_are_listed_and_bad_arguments(tmp_path):
    sweep = fake_sweep(tmp_path, {"a": A, "c": C})
    (sweep / "runs" / "c__seed2" / "summary.json").write_text(json.dumps({"step": 3, "steps": 10, "interrupted": True}))
    lb = build_leaderboard(sweep, metric="val_loss", margin=0.1)
    assert lb.missing == ["c__seed2"] and len(lb.groups[1].runs) == 2
    with pytest.raises(MoelabError, match="metric='ppl'"):
        build_leaderboard(sweep, metric="ppl")
    with pytest.raises(MoelabError, match="margin"):
        build_leaderboard(sweep, margin=0)
    with pytest.raises(MoelabError, match="not a sweep directory"):
        build_leaderboard(tmp_path / "runs")


# ----------------------------------------------------------------- what the page shows (issue 22)


def test_one_seed_says_pairwise_tests_need_two_seeds_instead_of_dashes(tmp_path):
    lb, md, page = write_leaderboard(fake_sweep(tmp_path / "sw", {"a": [3.0], "c": [3.5]}))
    for text in (md.read_text(), page.read_text()):
        assert "Pairwise tests need ≥2 seeds per configuration; this sweep has 1 seed(s)" in text
        assert "| a | c |" not in text and "<th class=\"l\">A</th>" not in text  # no table of dashes
    lb2 = build_leaderboard(fake_sweep(tmp_path / "sw3", {"a": A, "c": C}))
    assert lb2.pairwise_possible() and "need ≥2 seeds" not in lb2.to_markdown()


def _figs(tmp_path, groups, **run_kw):
    from moelab.sweep import plots

    lb = build_leaderboard(fake_sweep(tmp_path, groups, **run_kw), allow_unfair=True)
    return {f: (fig, cap) for f, fig, cap in plots.build_figures(lb)}, lb


def test_a_small_parameter_difference_stays_small_on_the_axis(tmp_path):
    """1000 vs 1003 active parameters (0.3%) may not fill the x axis (autoscale would)."""
    figs, _ = _figs(tmp_path, {"a": A, "c": C}, c={"active": 1003})
    ax = figs["sweep_quality_vs_active.png"][0].axes[0]
    lo, hi = ax.get_xlim()
    assert (hi - lo) >= 0.1 * 1001.5 * 0.999 and lo < 1000 < 1003 < hi
    assert (1003 - 1000) / (hi - lo) < 0.05
    from moelab.sweep.plots import pad_relative  # a real spread is left to autoscale

    fig, ax2 = __import__("matplotlib.pyplot", fromlist=["x"]).subplots()
    ax2.set_xlim(0, 1)
    pad_relative(ax2, "x", 1000, 2000)
    assert ax2.get_xlim() == (0, 1)


def test_legends_sit_outside_the_data_and_markers_stay_distinct(tmp_path):
    groups = {f"configuration-with-a-long-name-{i}": [3.0 + i / 100, 3.01 + i / 100] for i in range(10)}
    figs, lb = _figs(tmp_path, groups)
    for fname, (fig, cap) in figs.items():
        ax = fig.axes[0]
        r = fig.canvas.get_renderer()
        leg = ax.get_legend().get_window_extent(r)
        below = min(ax.bbox.y0, ax.xaxis.get_tightbbox(r).y0)  # the x tick labels and axis label
        assert leg.y1 <= below + 1, fname  # under the data and the x axis, overlapping neither
        assert len(ax.get_legend().get_texts()) == 10
        assert cap != ax.get_title() and len(cap) > 40  # the caption says what to look for
    from moelab.sweep.plots import _point_style

    assert len({tuple(sorted(_point_style(i).items())) for i in range(24)}) == 24


def test_leaderboard_page_renders_in_headless_chromium(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "analysis"))  # the browser probe
    from browser import check_page

    groups = {f"configuration-with-a-long-name-{i}": [3.0 + i / 100, 3.01 + i / 100] for i in range(4)}
    _, _, page = write_leaderboard(fake_sweep(tmp_path / "sw", groups), metric="val_loss", margin=0.05)
    assert check_page(page)["images"] == 4
